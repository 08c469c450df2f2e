"""The engine's vectorised samplers (llamaherd_server.sampling) against exact references."""

from __future__ import annotations

import numpy as np
import pytest

from llamaherd_server.sampling import (
    BLOCK,
    RANDOM_SEED,
    argmax_rows,
    finite_argmax,
    request_seed,
    softmax_sample_rows,
)


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


# ---- whatever a client sends samples without an error -------------------------------------


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e-30, 1e-6])
def test_any_positive_temperature_samples_a_token_of_the_row(temperature: float) -> None:
    """1/T overflowed float32 and made the row's maximum 0 * inf = NaN (issue 20)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 1000)).astype(np.float32)
    got = softmax_sample_rows(logits, [0, 1, 2], [temperature] * 3, [0.3, 0.6, 0.999])
    assert got == logits.argmax(axis=1).tolist()


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({3: np.nan}, None),
        ({5: np.inf}, 5),
        ({7: -np.inf}, None),
        ({i: np.nan for i in range(600)}, None),
        ({i: np.nan for i in range(1000)}, 0),
    ],
)
def test_nan_and_infinite_logits_fall_back_to_the_finite_argmax(
    bad: dict[int, float], expected: int | None
) -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 1000)).astype(np.float32)
    for i, v in bad.items():
        logits[1, i] = v
    clean = np.where(np.isfinite(logits[1]), logits[1], -np.inf)
    want = int(clean.argmax()) if expected is None else expected
    got = softmax_sample_rows(logits, [0, 1], [0.8, 0.8], [0.5, 0.5])
    assert 0 <= got[0] < 1000
    if not np.isnan(logits[1]).any() and not np.isposinf(logits[1]).any():
        return  # -inf is a valid logit (probability 0): a real draw
    assert got[1] == want
    assert finite_argmax(logits[1]) == want


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (None, None),
        (-1, None),
        (2**32 - 1, None),
        (2**64 - 1, None),
        (0, 0),
        (7, 7),
        (7 + 2**32, 7),
        (-5, 2**32 - 5),
        (2**63 - 1, None),  # its low 32 bits are all set
        (2**63 - 2, 2**32 - 2),
        (-(2**63), 0),
    ],
)
def test_seeds_reduce_to_32_bits_and_all_ones_means_random(
    seed: int | None, expected: int | None
) -> None:
    reduced = request_seed(seed)
    assert reduced == expected
    assert reduced is None or 0 <= reduced < RANDOM_SEED
