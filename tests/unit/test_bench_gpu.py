"""The GPU benchmark's helpers (bench/run.py, bench/loadgen.py, bench/report.py,
bench/gpu_checks.py) on made-up numbers: no model, no server, no GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_checks  # noqa: E402
import loadgen  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

from llamaherd_server.ggufgen import PRESETS  # noqa: E402


def test_gpu_samples_are_parsed_and_junk_lines_skipped() -> None:
    text = "87, 40213\n\n[N/A], 12\n100, 40300\nnot a sample\n"
    assert run.parse_gpu_samples(text) == [(87.0, 40213.0), (100.0, 40300.0)]


@pytest.mark.parametrize(
    ("flag", "value", "all_word", "expected"),
    [
        ("-ngl", None, "all", []),
        ("-ngl", -1, "all", ["-ngl", "all"]),
        ("-ngl", 0, "all", ["-ngl", "0"]),
        ("--gpu-layers", -1, None, ["--gpu-layers", "-1"]),
        ("--gpu-layers", 12, None, ["--gpu-layers", "12"]),
    ],
)
def test_gpu_layer_flags_only_when_asked(
    flag: str, value: int | None, all_word: str | None, expected: list[str]
) -> None:
    assert run.gpu_layers_flags(flag, value, all_word) == expected


def test_the_seed_requests_are_the_tutorials() -> None:
    path, body = run.seed_request("llamaherd", 7, 100, "m")
    assert path == "/v1/generate"
    assert body == {"prompt": "Explain topic 7", "max_tokens": 100, "priority": 1}
    path, body = run.seed_request("llama-server", 7, 100, "m")
    assert path == "/v1/completions"
    assert body["prompt"] == "Explain topic 7" and body["max_tokens"] == 100
    assert body["temperature"] == 0.7 and body["top_k"] == 0


def _result(i: int, sent: float, done: float | None, tokens: int, server_ms: float | None = None):
    r = loadgen.RequestResult(index=i, sent=sent, first_chunk=done, done=done)
    r.completion_tokens = tokens
    r.server_latency_ms = server_ms
    if done is None:
        r.error = "HTTP 500: boom"
    return r


def test_waves_summary_counts_tokens_over_the_wall_time() -> None:
    results = [
        _result(0, 0.0, 0.1, 100, 90.0),
        _result(1, 0.0, 0.3, 50, 280.0),
        _result(2, 0.0, None, 0),
    ]
    s = loadgen.summarize_waves(results, wall_s=0.5)
    assert (s["requests"], s["ok"], s["errors"]) == (3, 2, 1)
    assert s["output_tokens"] == 150 and s["tokens_per_s"] == pytest.approx(300.0)
    assert s["latency_ms"]["p50"] == pytest.approx(200.0)
    assert s["server_latency_ms"]["p50"] == pytest.approx(185.0)
    assert s["mean_output_tokens"] == pytest.approx(75.0)
    assert s["error_samples"] == ["HTTP 500: boom"]


def _chunks(*pieces: tuple[str, int]) -> list[tuple[str, int, float]]:
    return [(text, n, 0.0) for text, n in pieces]


def test_first_divergence_counts_tokens_not_chunks() -> None:
    a = _chunks(("a", 1), ("bc", 2), ("d", 1), ("e", 1))
    assert gpu_checks.first_divergence(a, list(a)) is None
    b = _chunks(("a", 1), ("bc", 2), ("x", 1), ("e", 1))
    assert gpu_checks.first_divergence(a, b) == 3
    assert gpu_checks.first_divergence(a, a[:2]) == 3
    assert gpu_checks.first_divergence(_chunks(("a", 1)), _chunks(("b", 1))) == 0


def _exposition(buckets: dict[str, int], total: float, decode_s: float) -> str:
    count = buckets["+Inf"]
    lines = ["# TYPE llamaherd_batch_size histogram"]
    lines += [f'llamaherd_batch_size_bucket{{le="{le}"}} {n}' for le, n in buckets.items()]
    lines += [f"llamaherd_batch_size_sum {total}", f"llamaherd_batch_size_count {count}"]
    lines += ["# TYPE llamaherd_decode_step_seconds histogram"]
    lines += [f'llamaherd_decode_step_seconds_bucket{{le="+Inf"}} {count}']
    lines += [f"llamaherd_decode_step_seconds_sum {decode_s}"]
    lines += [f"llamaherd_decode_step_seconds_count {count}"]
    return "\n".join(lines) + "\n"


def test_batch_stats_between_two_scrapes() -> None:
    before = _exposition({"1.0": 10, "2.0": 10, "8.0": 10, "16.0": 10, "+Inf": 10}, 10.0, 0.1)
    after = _exposition({"1.0": 12, "2.0": 14, "8.0": 20, "16.0": 20, "+Inf": 20}, 54.0, 0.2)
    stats = gpu_checks.batch_stats(before, after)
    assert stats["decode_steps"] == 10
    assert stats["steps_with_more_than_one_sequence"] == 8
    assert stats["mean_batch"] == pytest.approx(4.4)
    assert stats["largest_batch_bucket_le"] == 8.0
    assert stats["mean_decode_step_ms"] == pytest.approx(10.0)
    assert gpu_checks.batch_stats(before, before)["decode_steps"] == 0


def _results_with_seed(tokens_per_s: float, p50: float, p95: float) -> dict:
    seed = {
        "tokens_per_s": tokens_per_s,
        "requests_per_s": 1.0,
        "requests": 200,
        "ok": 200,
        "latency_ms": {"p50": p50, "p95": p95, "p99": p95},
        "server_latency_ms": {"p50": p50 - 5, "p95": p95 - 5, "p99": p95},
        "mean_output_tokens": 100.0,
        "batch": {"steps": 400, "mean": 46.0, "efficiency": 0.92},
        "gpu": {"utilization_mean_pct": 85.0, "utilization_max_pct": 99.0},
    }
    return {
        "meta": {
            "mode": "full",
            "started": "2026-12-01T00:00:00+00:00",
            "duration_s": 1,
            "machine": {
                "cpu": "x",
                "cores": 16,
                "memory_gib": 128,
                "kernel": "6",
                "python": "3.12",
                "llama_cpp_python": "0.3.36",
                "git_commit": "abc",
                "gpu": [{"name": "NVIDIA H200", "memory.total": "143771 MiB"}],
            },
            "loadavg_start": [0, 0, 0],
            "model": {"params_m": 1100.0},
            "workload": {
                "prompt_tokens": 32,
                "max_tokens": 64,
                "top_k": 40,
                "temperature": 0.8,
                "concurrency": [1],
                "seed": {"requests": 200, "wave": 50, "max_tokens": 100},
            },
            "server_config": {
                "slots": 64,
                "context_per_slot": 512,
                "threads": 4,
                "batch": 512,
                "gpu_layers": -1,
            },
            "skipped": ["open loop one-at-a-time"],
            "time_budget_s": 200,
        },
        "systems": {},
        "closed_loop": {},
        "open_loop": {},
        "seed": {"llamaherd": seed},
    }


def test_the_seed_targets_are_judged_and_reported() -> None:
    results = _results_with_seed(tokens_per_s=2400.0, p50=650.0, p95=480.0)
    rows = {t["target"]: t["ok"] for t in report.targets(results)}
    assert rows["seed workload: llamaherd tokens/s"] is True
    assert rows["seed workload: llamaherd latency p50"] is False
    assert rows["seed workload: llamaherd latency p95"] is True
    assert rows["seed workload: llamaherd batch efficiency"] is True
    assert rows["seed workload: GPU utilization"] is True
    md = report.markdown(results)
    assert "NVIDIA H200" in md and "GPU layers -1" in md
    assert "| seed workload: llamaherd latency p50 | 650 | < 200 ms | **MISS** |" in md
    assert "| llamaherd | 2400.0 |" in md
    assert "Skipped, out of the time budget (200 s): open loop one-at-a-time." in md


def test_the_gpu_preset_has_tinyllamas_shape() -> None:
    shape = PRESETS["gpu-1b"]
    assert (shape.n_embd, shape.n_layer, shape.n_head, shape.n_head_kv, shape.n_ff) == (
        2048,
        22,
        32,
        4,
        5632,
    )
    assert 1.05e9 < shape.n_params() < 1.15e9
