"""Write a tiny random-weight llama-architecture GGUF model with a real vocabulary.

The vocabulary (every ``tokenizer.*`` key: tokens, scores, types, special ids) is copied from one
of the vocabulary files in the llama.cpp tree's ``models/`` (``ggml-vocab-llama-spm.gguf`` by
default: Llama's 32k SentencePiece vocabulary), so ``llama-server`` tokenizes real text the way a
real model would, while the weights are random (seeded: the same options give the same file).
The model is useless for answers and fast to prefill: it exists so that tests and benchmarks see
a real engine's slots, prompt cache and usage counters.

    python scripts/make_tiny_gguf.py OUT.gguf [--vocab FILE] [--layers 4] [--dim 64] ...

``--vocab`` defaults to ``$SPECPROXY_LLAMA_DIR/src/llama.cpp/models/ggml-vocab-llama-spm.gguf``
(the tree that scripts/build_llama_server.sh unpacks). Needs the ``gguf`` package (and numpy).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama_dir() -> Path:
    """The cache directory scripts/build_llama_server.sh builds into."""
    named = os.environ.get("SPECPROXY_LLAMA_DIR")
    if named:
        return Path(named)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "specproxy" / "llama"


def default_vocab() -> Path:
    return llama_dir() / "src" / "llama.cpp" / "models" / "ggml-vocab-llama-spm.gguf"


def _copy_tokenizer(reader: Any, writer: Any) -> int:
    """Copy every ``tokenizer.*`` key of ``reader`` into ``writer`` with its own types; the count."""
    import gguf

    copied = 0
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer.") or not f.types:
            continue
        main = f.types[0]
        value = f.contents()
        if main == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, main, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, value, main)
        copied += 1
    return copied


def make(
    out: Path,
    vocab: Path,
    *,
    layers: int = 4,
    dim: int = 64,
    heads: int = 4,
    kv_heads: int = 4,
    ff: int = 192,
    context: int = 16384,
    seed: int = 0,
) -> Path:
    """Write the model to ``out`` (atomically) and return it."""
    import gguf
    import numpy as np

    if dim % heads or heads % kv_heads:
        raise SystemExit("--dim must be a multiple of --heads, and --heads of --kv-heads")
    reader = gguf.GGUFReader(str(vocab))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise SystemExit(f"{vocab} has no tokenizer.ggml.tokens")
    n_vocab = len(tokens.data)
    head_dim = dim // heads
    kv_dim = head_dim * kv_heads

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"specproxy-tiny-{layers}x{dim}")
    writer.add_context_length(context)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _copy_tokenizer(reader, writer)
    if "tokenizer.chat_template" not in reader.fields:
        writer.add_chat_template(CHATML)

    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> Any:
        # numpy (rows, cols) is ggml's {cols, rows}: llama.cpp's {n_in, n_out}.
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def ones(n: int) -> Any:
        return np.ones(n, dtype=np.float32)

    writer.add_tensor("token_embd.weight", matrix(n_vocab, dim))
    writer.add_tensor("output_norm.weight", ones(dim))
    writer.add_tensor("output.weight", matrix(n_vocab, dim))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(dim))
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(dim, dim))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv_dim, dim))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv_dim, dim))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(dim, dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(dim))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(ff, dim))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(ff, dim))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(dim, ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--vocab", type=Path, default=None, help="a ggml-vocab-*.gguf file (default: llama-spm)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="embedding length")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ff", type=int, default=192, help="feed-forward length")
    parser.add_argument("--context", type=int, default=16384, help="training context length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vocab = args.vocab or default_vocab()
    if not vocab.is_file():
        print(f"make_tiny_gguf: no vocabulary file at {vocab} (run scripts/build_llama_server.sh)", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make(args.out, vocab, layers=args.layers, dim=args.dim, heads=args.heads, kv_heads=args.kv_heads,
         ff=args.ff, context=args.context, seed=args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
