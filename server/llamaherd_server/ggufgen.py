"""Generate llama-architecture GGUF models with random weights, for tests, demos and benchmarks.

The model is real as far as llama.cpp is concerned (it loads, tokenizes, decodes and samples),
only its weights are noise, so its text is gibberish. No model is ever downloaded.

    python -m llamaherd_server.ggufgen --preset demo --out models/demo.gguf
    python -m llamaherd_server.ggufgen --n-embd 1024 --n-layer 12 --vocab 32000 --out m.gguf
    python -m llamaherd_server.ggufgen --preset gpu-1b --out gpu-1b.gguf   # ~1.1B, 2.2 GB
"""

from __future__ import annotations

import argparse
import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Token ids fixed by the generator (SentencePiece-style llama vocabulary).
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "can",
    "has",
    "more",
    "will",
    "if",
    "about",
    "up",
    "out",
    "who",
    "them",
    "what",
    "when",
    "so",
    "time",
    "into",
    "only",
    "some",
    "could",
    "new",
    "other",
    "two",
    "than",
    "then",
    "first",
    "any",
    "these",
    "may",
    "like",
    "over",
    "such",
    "our",
    "most",
    "very",
    "just",
    "also",
    "after",
    "know",
    "where",
    "way",
    "well",
    "model",
    "token",
    "batch",
    "queue",
    "server",
    "llama",
    "herd",
    "cluster",
    "request",
    "reply",
    "hello",
    "world",
    "system",
    "user",
    "assistant",
    "question",
    "answer",
    "story",
    "write",
    "tell",
    "explain",
    "data",
    "cloud",
    "fast",
    "slow",
    "small",
    "large",
]


@dataclass(frozen=True)
class ModelShape:
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 688
    vocab: int = 4096
    context_length: int = 32768
    dtype: str = "f16"  # f16 or f32

    def n_params(self) -> int:
        head_dim = self.n_embd // self.n_head
        attn = 2 * self.n_embd * self.n_embd + 2 * self.n_embd * self.n_head_kv * head_dim
        ffn = 3 * self.n_embd * self.n_ff
        per_layer = attn + ffn + 2 * self.n_embd
        return self.n_layer * per_layer + 2 * self.vocab * self.n_embd + self.n_embd


PRESETS: dict[str, ModelShape] = {
    # ~4,000 tok/s on 2 cores: unit-ish server tests.
    "tiny": ModelShape(),
    # ~30M parameters, ~400 tok/s single stream: tests where one request must outlast another.
    "small": ModelShape(n_embd=512, n_layer=8, n_head=8, n_head_kv=8, n_ff=1376, vocab=8192),
    # What `make run` serves.
    "demo": ModelShape(n_embd=512, n_layer=8, n_head=8, n_head_kv=8, n_ff=1376, vocab=8192),
    # ~220M parameters: the benchmark model.
    "bench": ModelShape(n_embd=1024, n_layer=12, n_head=16, n_head_kv=16, n_ff=2816, vocab=32000),
    # ~1.1B parameters, TinyLlama's shape (grouped-query attention, 4 KV heads): the GPU bench.
    "gpu-1b": ModelShape(n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632, vocab=32000),
}


def build_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-like vocabulary: specials, 256 byte tokens, then unique pieces."""
    from gguf import TokenType

    minimum = len(SPECIAL_TOKENS) + 256 + 2 * len(string.printable)
    if size < minimum:
        raise ValueError(f"vocab must be at least {minimum} tokens, got {size}")
    tokens = list(SPECIAL_TOKENS)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.CONTROL] * (len(SPECIAL_TOKENS) - 3)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    seen = set(tokens)
    pieces: list[str] = []

    def add(piece: str) -> None:
        if piece and piece not in seen:
            seen.add(piece)
            pieces.append(piece)

    for ch in string.ascii_letters + string.digits + string.punctuation:
        add(ch)
        add("\u2581" + ch)
    add("\u2581")
    add("\n")
    for word in _WORDS:
        add("\u2581" + word)
        add(word)
    # Fill the rest with unique letter combinations (deterministic), shortest first.
    letters = string.ascii_lowercase
    length = 2
    while len(tokens) + len(pieces) < size:
        for i in range(len(letters) ** length):
            if len(tokens) + len(pieces) >= size:
                break
            chars = []
            n = i
            for _ in range(length):
                chars.append(letters[n % len(letters)])
                n //= len(letters)
            piece = "".join(chars)
            add("\u2581" + piece)
            if len(tokens) + len(pieces) < size:
                add(piece)
        length += 1
    pieces = pieces[: size - len(tokens)]
    # Shorter pieces score higher so that the tokenizer prefers longer merges last.
    scores = [0.0] * len(tokens) + [-float(i) / 100.0 for i in range(len(pieces))]
    types += [TokenType.NORMAL] * len(pieces)
    return tokens + pieces, scores, [int(t) for t in types]


def write_model(
    path: Path,
    shape: ModelShape,
    *,
    seed: int = 0,
    name: str = "llamaherd-random",
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    """Write a llama-architecture GGUF with random weights to ``path``."""
    import gguf

    if shape.n_embd % shape.n_head or shape.n_head % shape.n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    if shape.dtype not in ("f16", "f32"):
        raise ValueError(f"dtype must be f16 or f32, got {shape.dtype!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wdtype = np.float16 if shape.dtype == "f16" else np.float32
    head_dim = shape.n_embd // shape.n_head
    kv_dim = head_dim * shape.n_head_kv

    tmp = path.with_suffix(path.suffix + ".tmp")  # write, then rename: no half-written models
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if shape.dtype == "f16" else gguf.LlamaFileType.ALL_F32
    )

    tokens, scores, types = build_vocab(shape.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    if chat_template:
        writer.add_chat_template(chat_template)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(wdtype)

    def norm() -> np.ndarray:
        return np.ones(shape.n_embd, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weight(shape.vocab, shape.n_embd))
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_dim, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_dim, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(shape.n_embd, shape.n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(shape.vocab, shape.n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the .gguf file")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for field, default in asdict(ModelShape()).items():
        if field == "dtype":
            parser.add_argument("--dtype", choices=["f16", "f32"], default=None)
        else:
            parser.add_argument(
                f"--{field.replace('_', '-')}",
                type=int,
                default=None,
                help=f"override the preset (tiny: {default})",
            )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = {f: getattr(args, f) for f in asdict(ModelShape()) if getattr(args, f) is not None}
    shape = replace(PRESETS[args.preset], **overrides)
    write_model(args.out, shape, seed=args.seed)
    print(f"wrote {args.out} ({shape.n_params() / 1e6:.1f}M parameters, {shape})")


if __name__ == "__main__":
    main()
