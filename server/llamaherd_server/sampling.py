"""Sampling without a pass over the vocabulary per sequence through llama.cpp's sampler API.

For the two commonest requests (:func:`sampling_mode` tells which path a request takes) the
engine samples the logits of every sequence of a step together, on a numpy view of llama.cpp's
output buffer:

* temperature 0 (greedy): one ``argmax`` over the rows;
* plain temperature sampling (the API's default: temperature > 0, no top-k, top-p or min-p,
  no penalties): the softmax of ``logits / T`` and one uniform draw per row, by inverse CDF.
  llama.cpp's ``dist`` sampler does this with a scalar ``expf`` per token (about 0.2-0.4 ms per
  sequence for a 32,000-token vocabulary on these cores, which on a GPU is most of a decode
  step); here the exponentials are vectorised over all rows and the cumulative sum is taken per
  block of the vocabulary and then inside one block, so every pass over the vocabulary is a
  SIMD one. The distribution is the same (up to float rounding); the random stream is the
  engine's own per-request generator, so a seed reproduces a request's output as before.

Every other sampler chain (top-k, top-p, min-p, penalties) stays with llama.cpp.

Whatever a client asks for samples without an error: temperatures below :data:`GREEDY_BELOW`
are greedy (below it float32 logits cannot tell the distribution from the argmax, and
``logits / T`` overflows), and rows whose logits hold NaN or infinities fall back to the argmax
of their finite values. Seeds follow llama.cpp: reduced to 32 bits, and the all-ones value
(what ``-1`` becomes) means "random".
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np

from .generation import SamplingParams

BLOCK = 256
# Temperatures below this sample greedily (every path: here and llama.cpp's chains).
GREEDY_BELOW = 1e-5
# llama.cpp's LLAMA_DEFAULT_SEED: a seed of -1 (or 2**32 - 1) asks for a random one.
RANDOM_SEED = 0xFFFFFFFF


class SamplingMode(enum.Enum):
    GREEDY = "greedy"  # temperature 0: the argmax
    SOFTMAX = "softmax"  # plain temperature sampling
    CHAIN = "chain"  # anything else: llama.cpp's sampler chain


def sampling_mode(p: SamplingParams) -> SamplingMode:
    """Which sampler a request needs: the engine samples GREEDY and SOFTMAX sequences of a step
    together (argmax_rows, softmax_sample_rows), CHAIN ones one by one through llama.cpp."""
    if p.has_penalties:
        return SamplingMode.CHAIN
    if p.temperature < GREEDY_BELOW:
        return SamplingMode.GREEDY
    if p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0:
        return SamplingMode.SOFTMAX
    return SamplingMode.CHAIN


def request_seed(seed: int | None) -> int | None:
    """A request's seed as the 32-bit value that both sampling paths draw with, or None for
    a random one: any integer is reduced modulo 2**32 (so -1 is 0xFFFFFFFF, as in llama.cpp,
    and means random, as does no seed)."""
    if seed is None:
        return None
    reduced = seed & 0xFFFFFFFF
    return None if reduced == RANDOM_SEED else reduced


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def finite_argmax(row: np.ndarray) -> int:
    """The argmax of a row's finite values (+inf counts as the largest); 0 when none is."""
    clean = np.nan_to_num(row, nan=-np.inf, posinf=_FLOAT32_MAX, neginf=-np.inf)
    return int(clean.argmax())


def argmax_rows(logits: np.ndarray, rows: Sequence[int]) -> list[int]:
    """The greedy token of each of ``rows`` (indices into ``logits``' first axis)."""
    picked = logits if len(rows) == logits.shape[0] else logits[list(rows)]
    tokens: list[int] = picked.argmax(axis=1).tolist()
    return tokens


def softmax_sample_rows(
    logits: np.ndarray,
    rows: Sequence[int],
    temperatures: Sequence[float],
    uniforms: Sequence[float],
) -> list[int]:
    """One token per row of ``logits[rows]``, drawn from softmax(row / temperature) with the
    uniform number in [0, 1) given for that row (inverse CDF: the first token whose cumulative
    probability exceeds it)."""
    n_vocab = logits.shape[1]
    # Overflow to inf and NaN rows are expected and handled below: no warnings for them.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        scaled = logits[list(rows)]  # a copy: the buffer is llama.cpp's
        scaled -= scaled.max(axis=1, keepdims=True)
        # 1/T in float64, capped at float32's largest: a tiny T must not make the row's maximum
        # (0 after the shift) 0 * inf = NaN. Callers send T >= GREEDY_BELOW; this holds for any T.
        inverse = np.minimum(1.0 / np.asarray(temperatures, dtype=np.float64), _FLOAT32_MAX)
        scaled *= inverse.astype(np.float32)[:, None]
        np.exp(scaled, out=scaled)
        starts = np.arange(0, n_vocab, BLOCK)
        block_sums = np.add.reduceat(scaled, starts, axis=1, dtype=np.float64)
    block_cum = np.cumsum(block_sums, axis=1)
    totals = block_cum[:, -1]
    tokens: list[int] = []
    for i, u in enumerate(uniforms):
        if not (np.isfinite(totals[i]) and totals[i] > 0):
            # NaN or infinite logits (a broken model or kernel): no distribution to draw from.
            tokens.append(finite_argmax(logits[rows[i]]))
            continue
        cum = block_cum[i]
        target = float(u) * cum[-1]
        block = min(int(np.searchsorted(cum, target, side="right")), len(cum) - 1)
        before = cum[block - 1] if block else 0.0
        start = block * BLOCK
        inner = np.cumsum(scaled[i, start : start + BLOCK], dtype=np.float64)
        k = int(np.searchsorted(inner, target - before, side="right"))
        if k >= len(inner):  # float rounding put the target past the block's total
            k = int(np.flatnonzero(scaled[i, start : start + BLOCK])[-1])
        tokens.append(start + k)
    return tokens
