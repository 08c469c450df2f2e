"""The engine's vectorised samplers (llamaherd_server.sampling) against exact references."""

from __future__ import annotations

import numpy as np
import pytest

from llamaherd_server.sampling import BLOCK, argmax_rows, softmax_sample_rows


def reference(row: np.ndarray, temperature: float, u: float) -> tuple[int, np.ndarray]:
    """Inverse CDF of softmax(row / T) in float64, and the CDF itself."""
    x = row.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    cdf = np.cumsum(p) / p.sum()
    return int(np.searchsorted(cdf, u, side="right")), cdf


def test_argmax_rows_is_numpys_argmax() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 1000)).astype(np.float32)
    assert argmax_rows(logits, range(5)) == logits.argmax(axis=1).tolist()
    assert argmax_rows(logits, [3, 1]) == [int(logits[3].argmax()), int(logits[1].argmax())]


@pytest.mark.parametrize("n_vocab", [7, BLOCK, 1000, 32000])
def test_softmax_sampling_is_the_inverse_cdf(n_vocab: int) -> None:
    rng = np.random.default_rng(n_vocab)
    for _ in range(20):
        logits = (rng.normal(size=(4, n_vocab)) * rng.uniform(0.5, 8)).astype(np.float32)
        temps = rng.uniform(0.05, 2.0, size=3).tolist()
        uniforms = rng.random(3).tolist()
        rows = [2, 0, 3]
        got = softmax_sample_rows(logits, rows, temps, uniforms)
        for row, t, u, token in zip(rows, temps, uniforms, got, strict=True):
            want, cdf = reference(logits[row], t, u)
            if token != want:
                # Only a draw that falls on a CDF step, to float32 rounding, may differ.
                assert abs(cdf[min(token, want)] - u) < 1e-5, (token, want, u)


def test_softmax_sampling_frequencies_follow_the_distribution() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 600)).astype(np.float32) * 2
    logits[0, 599] = logits.max() + 1  # a likely token in the last, partial block
    t = 0.8
    n = 20000
    counts = np.zeros(600)
    for u in rng.random(n):
        counts[softmax_sample_rows(logits, [0], [t], [u])[0]] += 1
    _, cdf = reference(logits[0], t, 0.5)
    expected = np.diff(np.concatenate([[0.0], cdf])) * n
    big = expected > 50
    # Within 5 standard deviations of a binomial count, token by token.
    sd = np.sqrt(expected[big] * (1 - expected[big] / n))
    assert np.all(np.abs(counts[big] - expected[big]) < 5 * sd + 1)
    assert counts[expected == 0].sum() == 0


def test_a_low_temperature_is_nearly_greedy_and_the_input_is_left_alone() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 5000)).astype(np.float32) * 4
    before = logits.copy()
    got = softmax_sample_rows(logits, [0, 1, 2], [1e-4] * 3, [0.0, 0.5, 0.999999])
    assert got == logits.argmax(axis=1).tolist()
    assert np.array_equal(logits, before), "llama.cpp's buffer must not be written"
