// The official Anthropic TypeScript SDK through specproxy: prewarm while the user types, then ask.
//
//   npm install
//   SPECPROXY_URL=http://127.0.0.1:8787 ANTHROPIC_API_KEY=sk-ant-... node example.mjs
//
// Plain ES-module JavaScript (no TypeScript toolchain needed); the calls are the same in a .ts file.
// Nothing changes in the SDK call but `baseURL`. When "typing starts", one fetch() to /prewarm sends
// the shared context upstream with cache_control and max_tokens 0; the question then reads the warm
// cache (or, if it comes early, is held until the warm has written it). Against the simulator
// (`specproxy sim`) any API key works.

import Anthropic from "@anthropic-ai/sdk";

const PROXY = (process.env.SPECPROXY_URL ?? "http://127.0.0.1:8787").replace(/\/+$/, "");
const API_KEY = process.env.ANTHROPIC_API_KEY ?? "any-key-works-with-the-simulator";
const MODEL = "claude-sonnet-4-6";
const TYPING_MS = 1000 * Number(process.env.SPECPROXY_TYPING_SECONDS ?? "3");

// A large shared context (~5k tokens of code), with the cache breakpoint on it.
const code = Array.from(
  { length: 500 },
  (_, i) => `export function step${i}(state) {\n  return { ...state, counter: state.counter + ${i} };\n}\n`,
).join("\n");
const CONTEXT = { type: "text", text: code, cache_control: { type: "ephemeral" } };
const SYSTEM = "You are an expert JavaScript programmer. Answer questions about the code you are given.";

/** POST /prewarm with the prefix the question will share: same model, system and context block. */
async function prewarm() {
  const response = await fetch(`${PROXY}/prewarm`, {
    method: "POST",
    headers: { "x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json" },
    body: JSON.stringify({ model: MODEL, system: SYSTEM, messages: [{ role: "user", content: [CONTEXT] }] }),
  });
  if (!response.ok) throw new Error(`POST /prewarm answered ${response.status}: ${await response.text()}`);
  return response.json(); // 202 at once: the warm runs in the background
}

async function main() {
  const client = new Anthropic({ baseURL: PROXY, apiKey: API_KEY });

  console.log("typing starts: POST /prewarm ->", JSON.stringify(await prewarm()));
  await new Promise((resolve) => setTimeout(resolve, TYPING_MS)); // the user types; the proxy warms meanwhile
  const question = "What does step42 add to the counter?";
  console.log("question:", question);

  const { data: message, response } = await client.messages
    .create({
      model: MODEL,
      max_tokens: 300,
      system: SYSTEM,
      messages: [{ role: "user", content: [CONTEXT, { type: "text", text: question }] }],
    })
    .withResponse();

  console.log("X-Cache-Warm:", response.headers.get("x-cache-warm"));
  console.log("X-Cache-Warm-Wait-Ms:", response.headers.get("x-cache-warm-wait-ms"));
  console.log("X-Cache-Warm-Prefix:", response.headers.get("x-cache-warm-prefix"));
  const u = message.usage;
  console.log(
    `usage: input_tokens=${u.input_tokens} cache_read_input_tokens=${u.cache_read_input_tokens} ` +
      `cache_creation_input_tokens=${u.cache_creation_input_tokens} output_tokens=${u.output_tokens}`,
  );
  const text = message.content.filter((b) => b.type === "text").map((b) => b.text).join("");
  console.log("answer:", text.length > 200 ? `${text.slice(0, 200)}…` : text);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
