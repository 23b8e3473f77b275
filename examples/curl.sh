#!/usr/bin/env bash
# specproxy with nothing but curl: prewarm while the user types, then ask, and show X-Cache-Warm.
#
#   SPECPROXY_URL=http://127.0.0.1:8787 ANTHROPIC_API_KEY=sk-ant-... bash examples/curl.sh
#
# Against the simulator (`specproxy sim`) any API key works.
set -euo pipefail

PROXY="${SPECPROXY_URL:-http://127.0.0.1:8787}"
PROXY="${PROXY%/}"
API_KEY="${ANTHROPIC_API_KEY:-any-key-works-with-the-simulator}"
MODEL="claude-sonnet-4-6"
TYPING_SECONDS="${SPECPROXY_TYPING_SECONDS:-3}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# A large shared context (~4k tokens of code) as one JSON string; the breakpoint goes on its block.
context=""
for i in $(seq 1 400); do
  context+="def step_${i}(state):\\n    return state + ${i}\\n\\n"
done
context_block="{\"type\": \"text\", \"text\": \"${context}\", \"cache_control\": {\"type\": \"ephemeral\"}}"
system="You are an expert Python programmer. Answer questions about the code you are given."

# 1. Typing starts: POST /prewarm with the prefix the question will share (202 at once).
printf '{"model": "%s", "system": "%s", "messages": [{"role": "user", "content": [%s]}]}' \
  "$MODEL" "$system" "$context_block" > "$tmp/warm.json"
echo -n "typing starts: POST /prewarm -> "
curl -sS "$PROXY/prewarm" \
  -H "x-api-key: $API_KEY" -H "anthropic-version: 2023-06-01" -H "content-type: application/json" \
  --data-binary "@$tmp/warm.json"
echo

# 2. The user types; the proxy warms the cache meanwhile.
sleep "$TYPING_SECONDS"

# 3. The question: same model, system and context block, then the question after the breakpoint.
question="What does step_42 add to the state?"
echo "question: $question"
printf '{"model": "%s", "max_tokens": 300, "system": "%s", "messages": [{"role": "user", "content": [%s, {"type": "text", "text": "%s"}]}]}' \
  "$MODEL" "$system" "$context_block" "$question" > "$tmp/question.json"
curl -sS "$PROXY/v1/messages" \
  -H "x-api-key: $API_KEY" -H "anthropic-version: 2023-06-01" -H "content-type: application/json" \
  --data-binary "@$tmp/question.json" -D "$tmp/headers.txt" -o "$tmp/answer.json"

# The X-Cache-Warm headers say what the proxy did; the usage says what the cache did.
grep -i '^x-cache-warm' "$tmp/headers.txt" | tr -d '\r'
echo "usage:"
grep -oE '"(input_tokens|cache_read_input_tokens|cache_creation_input_tokens|output_tokens)": ?[0-9]+' \
  "$tmp/answer.json" | sed -e 's/"//g' -e 's/: */: /' -e 's/^/  /'
