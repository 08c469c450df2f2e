"""`make profile` (bench/token_profile.py): its arithmetic on made-up dumps, and one real run on the
tiny model, server and gateway under the script's timers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import token_profile as bench_profile  # noqa: E402

from llamaherd_server.ggufgen import PRESETS  # noqa: E402


def dump(wall: dict[str, float], cpu: dict[str, float], threads: dict[str, float]) -> dict:
    return {"wall_s": wall, "cpu_s": cpu, "thread_cpu_s": threads, "calls": {}}


def test_breakdown_parts_add_up_per_token() -> None:
    server = dump(
        {
            "engine.step": 0.5,
            "engine.llama_decode": 0.4,
            "engine.plan": 0.01,
            "engine.commit": 0.01,
            "engine.sample+accept": 0.05,
            "engine.accept": 0.02,
            "engine.accept.detokenize": 0.005,
            "engine.accept.stop": 0.003,
            "engine.accept.emit": 0.002,
            "engine.handoff": 0.004,
        },
        {"engine.step": 0.45, "engine.llama_decode": 0.38},
        {
            "loop": 0.1,
            "engine": 0.46,
            "process": 1.0,
            "engine voluntary switches": 10.0,
            "engine nonvoluntary switches": 200.0,
        },
    )
    server["wall_s"]["loop.text_frames"] = 0.01
    server["wall_s"]["loop.write"] = 0.03
    gateway = dump({"gateway.parse": 0.001, "loop.write": 0.02}, {}, {"process": 0.08})
    out = bench_profile.breakdown(server, gateway, tokens=1000)
    engine = out["engine"]
    parts = [k for k in engine if k not in ("step wall",) and engine is not None]
    summed = sum(
        engine[k]
        for k in parts
        if not k.startswith(("thread cpu", "wait", "voluntary", "nonvoluntary"))
    )
    assert summed == pytest.approx(engine["step wall"], abs=0.01)
    assert engine["step wall"] == pytest.approx(500.0)  # 0.5 s over 1000 tokens, in us
    assert engine["sample"] == pytest.approx(30.0)
    assert engine["accept: rest"] == pytest.approx(10.0)
    assert engine["wait in steps (GIL or a core)"] == pytest.approx(50.0)
    assert engine["voluntary switches per token"] == pytest.approx(0.01)
    assert engine["nonvoluntary switches per token"] == pytest.approx(0.2)
    loop = out["loop"]
    assert loop["framing (json, sse)"] == pytest.approx(10.0)
    assert loop["rest"] == pytest.approx(100.0 - 10.0 - 30.0)
    assert out["process"]["llama.cpp workers and other threads"] == pytest.approx(1000 - 460 - 100)
    g = out["gateway"]
    assert g["relay rest"] == pytest.approx(80.0 - 1.0 - 20.0)


@pytest.mark.server
@pytest.mark.slow
def test_profile_runs_on_the_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    """The make target end to end: both processes under timers, every part measured."""
    cmd = [sys.executable, str(BENCH / "token_profile.py"), "--model", str(tiny_model)]
    vocab = PRESETS["tiny"].vocab
    cmd += ["--vocab", str(vocab), "--streams", "1,2", "--requests", "4", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert [p["streams"] for p in result["points"]] == [1, 2]
    for point in result["points"]:
        direct = point["direct"]
        assert direct["tokens"] > 0 and direct["errors"] == 0
        assert point["gateway"]["tokens"] > 0 and point["gateway"]["errors"] == 0
        profile = direct["profile_us_per_token"]
        assert profile["engine"]["llama_decode"] > 0
        assert profile["engine"]["accept: stop strings"] > 0  # the stop string is checked
        assert profile["loop"]["thread cpu"] > 0
        assert profile["loop"]["writes (ASGI send)"] > 0
        assert point["gateway"]["profile_us_per_token"]["gateway"]["process cpu"] > 0
    assert "| 1 |" in (tmp_path / "results.md").read_text()
