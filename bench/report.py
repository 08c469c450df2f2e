"""Turn bench/results/results.json into results.md, PNG plots and the table in bench/README.md.

    python bench/report.py [bench/results]

Targets are computed from the numbers, each with pass or MISS; nothing is left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common import table_head

SYSTEMS = ("llamaherd", "llama-server", "one-at-a-time")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
COLORS = {"llamaherd": "tab:blue", "llama-server": "tab:orange", "one-at-a-time": "tab:gray"}
README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
# The seed tutorial's performance targets (shared/SEED-tutorial.md, "Performance Targets").
SEED_TARGETS = {"tokens_per_s": 500.0, "p50_ms": 200.0, "p95_ms": 500.0, "efficiency": 0.9}


def _f(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def _pcts(d: dict[str, float | None]) -> str:
    return " / ".join(_f(d[k]) for k in ("p50", "p95", "p99"))


def _cpu(point: dict[str, Any]) -> str:
    if "foreign_cpu_cores" not in point:
        return f"load {point['loadavg_before'][0]}"
    return f"{point['foreign_cpu_cores']:.2f} / {point.get('steal_cpu_cores', 0):.2f}"


def _closed(results: dict[str, Any], system: str, c: int) -> dict[str, Any] | None:
    return results.get("closed_loop", {}).get(system, {}).get(str(c))


def _concurrencies(results: dict[str, Any]) -> list[int]:
    return [int(c) for c in results["meta"]["workload"]["concurrency"]]


def _target(
    name: str, value: float | None, bound: float | None, ok: bool | None, unit: str
) -> dict[str, Any]:
    return {"target": name, "value": value, "bound": bound, "ok": ok, "unit": unit}


def _at(point: dict[str, Any] | None, *keys: str) -> Any:
    """``point[key][key]...``, or None without a point."""
    value: Any = point
    for key in keys if point else ():
        value = value[key]
    return value


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def _throughput_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for c in _concurrencies(results):
        if c > 16:
            continue
        lh, ls = _closed(results, "llamaherd", c), _closed(results, "llama-server", c)
        r = _ratio(_at(lh, "tokens_per_s"), _at(ls, "tokens_per_s"))
        out.append(
            _target(f"throughput llamaherd / llama-server, c={c}", r, 1.0, _at_least(r, 1.0), "x")
        )
    lh, one = _closed(results, "llamaherd", 16), _closed(results, "one-at-a-time", 16)
    r = _ratio(_at(lh, "tokens_per_s"), _at(one, "tokens_per_s"))
    out.append(
        _target("throughput llamaherd / one-at-a-time, c=16", r, 3.5, _at_least(r, 3.5), "x")
    )
    return out


def _latency_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for c in (8, 16):
        lh, ls = _closed(results, "llamaherd", c), _closed(results, "llama-server", c)
        for metric, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL")):
            r = _ratio(_at(lh, metric, "p95"), _at(ls, metric, "p95"))
            out.append(
                _target(
                    f"{label} p95 llamaherd / llama-server, c={c}",
                    r,
                    1.2,
                    None if r is None else r <= 1.2,
                    "x (lower is better)",
                )
            )
    return out


def _engine_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    engine = results.get("engine")
    if not engine:
        return []
    rows = engine["batched_bench"]["rows"]
    out = []
    for b, ours in engine["llamaherd"].items():
        theirs = rows.get(b)
        r = _ratio(ours["tg_tokens_per_s"], _at(theirs, "tg_tokens_per_s"))
        out.append(
            _target(
                f"engine-only decode tok/s / llama-batched-bench S_TG, B={b}",
                r,
                0.95,
                _at_least(r, 0.95),
                "x",
            )
        )
    return out


def _seed_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    seed = (results.get("seed") or {}).get("llamaherd")
    if not seed:
        return []
    t = SEED_TARGETS
    tps = seed["tokens_per_s"]
    out = [
        _target(
            "seed workload: llamaherd tokens/s",
            tps,
            t["tokens_per_s"],
            tps > t["tokens_per_s"],
            "tok/s",
        )
    ]
    for q, bound in (("p50", t["p50_ms"]), ("p95", t["p95_ms"])):
        v = seed["latency_ms"][q]
        ok = None if v is None else v < bound
        out.append(
            _target(f"seed workload: llamaherd latency {q}", v, bound, ok, "ms (lower is better)")
        )
    eff = (seed.get("batch") or {}).get("efficiency")
    ok = None if eff is None else eff > t["efficiency"]
    out.append(
        _target("seed workload: llamaherd batch efficiency", eff, t["efficiency"], ok, "fraction")
    )
    util = (seed.get("gpu") or {}).get("utilization_mean_pct")
    if util is not None:
        out.append(_target("seed workload: GPU utilization", util, 80.0, util > 80.0, "%"))
    return out


def _memory_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    lh_peak = _peak_rss(results, "llamaherd")
    ls_peak = _peak_rss(results, "llama-server")
    py = (results.get("python_baseline_rss_kb") or {}).get("imports")
    if not (lh_peak and ls_peak and py):
        return []
    bound = 1.3 * ls_peak + py
    return [
        _target(
            "RSS under load: llamaherd <= 1.3 x llama-server + Python baseline",
            lh_peak / 1024,
            bound / 1024,
            lh_peak <= bound,
            "MiB",
        )
    ]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with the measured value, the bound and pass/MISS."""
    return [
        *_throughput_targets(results),
        *_latency_targets(results),
        *_engine_targets(results),
        *_seed_targets(results),
        *_memory_targets(results),
    ]


def _peak_rss(results: dict[str, Any], system: str) -> int | None:
    points = results.get("closed_loop", {}).get(system, {})
    peaks = [p["rss_peak_kb"] for p in points.values() if p.get("rss_peak_kb")]
    return max(peaks) if peaks else None


def _gpu_words(machine: dict[str, Any]) -> str:
    gpus = machine.get("gpu")
    if not gpus:
        return "no GPU"
    return ", ".join(
        f"{g.get('name', '?')} ({g.get('memory.total', '?')}, "
        f"driver {g.get('driver_version', '?')})"
        for g in gpus
    )


def _seed_section(results: dict[str, Any]) -> list[str]:
    seed = results.get("seed")
    if not seed:
        return []
    w = results["meta"]["workload"].get("seed") or {}
    t = SEED_TARGETS
    lines = [
        "",
        f"## The seed's workload ({w.get('requests')} requests, waves of {w.get('wave')})",
        "",
        f"shared/SEED-tutorial.md, Step 5: prompt `Explain topic {{i}}`, max_tokens "
        f"{w.get('max_tokens')}, priority i % 3, non-streaming; a wave of requests at once, the "
        "next when all have answered. llamaherd: its `/v1/generate`; llama-server: the same "
        "prompts over `/v1/completions` at temperature 0.7 (llamaherd's default). Targets: "
        f"> {t['tokens_per_s']:.0f} tokens/s, latency p50 < {t['p50_ms']:.0f} ms and p95 < "
        f"{t['p95_ms']:.0f} ms, batch efficiency (mean sequences per decode / min(wave, slots)) "
        f"> {t['efficiency']:.0%}, GPU utilization > 80%. Latency is the client's, send to reply; "
        "llamaherd's own `latency_ms` beside it.",
        "",
        *table_head(
            *("system", "tok/s", "req/s", "latency p50 / p95 / p99", "server latency_ms p50 / p95"),
            *("mean tokens", "mean batch", "efficiency", "GPU util mean / max", "ok"),
        ),
    ]
    for s in SYSTEMS:
        p = seed.get(s)
        if not p:
            continue
        batch = p.get("batch") or {}
        gpu = p.get("gpu") or {}
        server = p.get("server_latency_ms")
        lines.append(
            f"| {s} | {p['tokens_per_s']:.1f} | {p['requests_per_s']:.2f} | "
            f"{_pcts(p['latency_ms'])} | "
            f"{(_f(server['p50']) + ' / ' + _f(server['p95'])) if server else '-'} | "
            f"{_f(p.get('mean_output_tokens'), '.1f')} | {_f(batch.get('mean'), '.1f')} | "
            f"{_f(batch.get('efficiency'), '.2f')} | "
            f"{_f(gpu.get('utilization_mean_pct'))} / {_f(gpu.get('utilization_max_pct'))} | "
            f"{p['ok']}/{p['requests']} |"
        )
    return lines


def _header(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    m = meta["machine"]
    w = meta["workload"]
    cfg = meta["server_config"]
    lines = [
        f"# Serving benchmark results ({meta['mode']} run)",
        "",
        f"- Started {meta['started']}, took {meta.get('duration_s', '?')} s; "
        f"git {m['git_commit']}.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, llama-cpp-python {m['llama_cpp_python']} ({_gpu_words(m)}).",
        f"- Load average (1/5/15 min) at start {meta['loadavg_start']}, at end "
        f"{meta.get('loadavg_end')}. Per point, `other / steal` is the CPU that other processes "
        f"used while it ran and the CPU the hypervisor stole, in cores.",
        f"- Model: generated llama-architecture GGUF, {results['meta']['model']['params_m']}M "
        f"parameters, F16, random weights.",
        f"- Servers: {cfg['slots']} slots x {cfg['context_per_slot']} tokens, {cfg['threads']} "
        f"threads, batch {cfg['batch']}"
        + (f", GPU layers {cfg['gpu_layers']}" if cfg.get("gpu_layers") is not None else "")
        + f". Requests: {w['prompt_tokens']} prompt tokens (random ids, "
        f"unique per request), {w['max_tokens']} output tokens (`ignore_eos`), top-k "
        f"{w['top_k']} + temperature {w['temperature']}, streamed.",
    ]
    if meta.get("skipped"):
        lines.append(
            f"- Skipped, out of the time budget ({meta.get('time_budget_s')} s): "
            + ", ".join(meta["skipped"])
            + "."
        )
    return lines


def _bound_words(t: dict[str, Any], fmt: str) -> str:
    """A target's bound as the table says it: ``>= 1.000``, ``<= 1.200``, ``< 200 ms``, ..."""
    bound = _f(t["bound"], fmt)
    if t["unit"].startswith("x (lower"):
        return f"<= {bound}"
    if t["unit"] == "MiB":
        return f"<= {bound} MiB"
    if t["unit"].startswith("ms"):
        return f"< {bound} ms"
    if t["unit"] in ("tok/s", "%", "fraction"):
        return f"> {bound}" + ("" if t["unit"] == "fraction" else f" {t['unit']}")
    return f">= {bound}"


def _targets_section(results: dict[str, Any]) -> list[str]:
    lines = ["", "## Targets", "", *table_head("target", "measured", "bound", "result")]
    for t in targets(results):
        verdict = "n/a" if t["ok"] is None else ("pass" if t["ok"] else "**MISS**")
        fmt = ".0f" if t["unit"] in ("MiB", "tok/s", "%") or t["unit"].startswith("ms") else ".3f"
        lines.append(
            f"| {t['target']} | {_f(t['value'], fmt)} | {_bound_words(t, fmt)} | {verdict} |"
        )
    return lines


def _load_row(label: str, p: dict[str, Any]) -> str:
    """The columns a closed-loop and an open-loop row share, after the first ones."""
    return (
        f"{label} | {p['tokens_per_s']:.1f} | {p['requests_per_s']:.2f} | "
        f"{_pcts(p['ttft_ms'])} | {_pcts(p['itl_ms'])} | {_pcts(p['e2e_ms'])} |"
    )


def _closed_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Closed loop (concurrency sweep)",
        "",
        "Latencies in ms as p50 / p95 / p99, measured by the client. Mean batch: sequences per "
        "llama_decode (llamaherd: `llamaherd_batch_size`; llama-server: busy slots per decode).",
        "",
        *table_head(
            *("c", "system", "tok/s", "req/s", "TTFT", "ITL", "end-to-end", "mean batch"),
            *("peak RSS MiB", "ok", "other / steal"),
        ),
    ]
    for c in _concurrencies(results):
        for s in SYSTEMS:
            p = _closed(results, s, c)
            if p is None:
                continue
            batch = p.get("batch") or {}
            lines.append(
                f"| {c} | {_load_row(s, p)} "
                f"{_f(batch.get('mean'), '.1f')} | {p['rss_peak_kb'] / 1024:.0f} | "
                f"{p['ok']}/{p['requests']} | {_cpu(p)} |"
            )
    lines += [
        "",
        "Throughput ratios:",
        "",
        *table_head("c", "llamaherd / llama-server", "llamaherd / one-at-a-time"),
    ]
    for c in _concurrencies(results):
        lh, ls, one = (_closed(results, s, c) for s in SYSTEMS)
        r1 = lh["tokens_per_s"] / ls["tokens_per_s"] if lh and ls else None
        r2 = lh["tokens_per_s"] / one["tokens_per_s"] if lh and one else None
        lines.append(f"| {c} | {_f(r1, '.2f')} | {_f(r2, '.2f')} |")
    return lines


def _batch_section(results: dict[str, Any]) -> list[str]:
    dists = [
        (c, p["batch"])
        for c in _concurrencies(results)
        if (p := _closed(results, "llamaherd", c)) and p.get("batch")
    ]
    if not dists:
        return []
    lines = [
        "",
        "llamaherd batch-size distribution (decode steps per `llamaherd_batch_size` bucket, "
        "`le` = upper bound):",
        "",
        *table_head("c", "steps", "distribution"),
    ]
    for c, d in dists:
        dist = ", ".join(f"<={le}: {n}" for le, n in d["le_counts"].items())
        lines.append(f"| {c} | {d['steps']} | {dist} |")
    return lines


def _open_section(results: dict[str, Any]) -> list[str]:
    if not results.get("open_loop"):
        return []
    ol = results["meta"]["workload"].get("open_loop") or {}
    lines = [
        "",
        f"## Open loop (Poisson arrivals, {ol.get('rate_rps')} requests/s, "
        f"{ol.get('requests')} requests)",
        "",
        "Latency counts from the scheduled arrival.",
        "",
        *table_head("system", "tok/s", "req/s", "TTFT", "ITL", "end-to-end", "ok", "other / steal"),
    ]
    for s in SYSTEMS:
        p = results["open_loop"].get(s)
        if p:
            lines.append(f"| {_load_row(s, p)} {p['ok']}/{p['requests']} | {_cpu(p)} |")
    return lines


def _engine_section(results: dict[str, Any]) -> list[str]:
    engine = results.get("engine")
    if not engine:
        return []
    rows = engine["batched_bench"]["rows"]
    lines = [
        "",
        "## Engine only (no HTTP): 32-token prompts, 48 generated tokens per sequence",
        "",
        "Decode tok/s = B x 48 / time from first to last generated token (llamaherd, sampling "
        "and streaming hand-off included) against llama-batched-bench's S_TG; total = all "
        "prompt and generated tokens over the whole run (S). Medians of the runs.",
        "",
        *table_head(
            *("B", "llamaherd decode tok/s", "batched-bench S_TG", "ratio"),
            *("llamaherd total tok/s", "batched-bench S"),
        ),
    ]
    for b, ours in engine["llamaherd"].items():
        theirs = rows.get(b, {})
        tg = theirs.get("tg_tokens_per_s")
        lines.append(
            f"| {b} | {ours['tg_tokens_per_s']:.1f} | {_f(tg, '.1f')} | "
            f"{_f(tg and ours['tg_tokens_per_s'] / tg, '.2f')} | "
            f"{ours['total_tokens_per_s']:.1f} | "
            f"{_f(theirs.get('total_tokens_per_s'), '.1f')} |"
        )
    return [*lines, "", f"`{engine['batched_bench']['argv']}`"]


def _memory_section(results: dict[str, Any]) -> list[str]:
    py = results.get("python_baseline_rss_kb") or {}
    lines = [
        "",
        "## Memory (VmRSS, MiB)",
        "",
        *table_head("system", "after load", "idle after warm-up", "peak under load"),
    ]
    for s in SYSTEMS:
        info = results["systems"].get(s)
        if not info:
            continue
        lines.append(
            f"| {s} | {_f((info.get('rss_ready_kb') or 0) / 1024)} | "
            f"{_f((info.get('rss_idle_kb') or 0) / 1024)} | "
            f"{_f((_peak_rss(results, s) or 0) / 1024)} |"
        )
    return [
        *lines,
        "",
        f"Python baseline: bare interpreter {_f((py.get('bare') or 0) / 1024)} MiB; with the "
        f"server's imports (llamaherd_server.api, llama_cpp, uvicorn) and no model "
        f"{_f((py.get('imports') or 0) / 1024)} MiB.",
    ]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        *_header(results),
        *_targets_section(results),
        *_seed_section(results),
        *_closed_section(results),
        *_batch_section(results),
        *_open_section(results),
        *_engine_section(results),
        *_memory_section(results),
        "",
        "Plots: `throughput.png`, `latency.png`, `engine.png`.",
        "",
    ]
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    conc = _concurrencies(results)
    present = [s for s in SYSTEMS if results["closed_loop"].get(s)]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in present:
        xs = [c for c in conc if _closed(results, s, c)]
        ys = [_closed(results, s, c)["tokens_per_s"] for c in xs]  # type: ignore[index]
        ax.plot(xs, ys, marker="o", label=s, color=COLORS[s])
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrent streams (closed loop)")
    ax.set_ylabel("output tokens/s (aggregate)")
    ax.set_title("Throughput vs concurrency")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"p50": "-", "p95": "--", "p99": ":"}
    for ax, (metric, title) in zip(
        axes, (("ttft_ms", "Time to first token"), ("itl_ms", "Inter-token latency")), strict=True
    ):
        for s in present:
            xs = [c for c in conc if _closed(results, s, c)]
            for q, style in styles.items():
                ys = [_closed(results, s, c)[metric][q] for c in xs]  # type: ignore[index]
                ax.plot(xs, ys, style, marker="o", markersize=3, color=COLORS[s], label=f"{s} {q}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent streams (closed loop)")
        ax.set_ylabel("ms (log scale)")
        ax.set_title(f"{title}: p50 solid, p95 dashed, p99 dotted")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=len(present))
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)

    engine = results.get("engine")
    if engine:
        rows = engine["batched_bench"]["rows"]
        bs = list(engine["llamaherd"])
        x = list(range(len(bs)))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ours = [engine["llamaherd"][b]["tg_tokens_per_s"] for b in bs]
        theirs = [rows.get(b, {}).get("tg_tokens_per_s", 0) for b in bs]
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="llamaherd Engine", color="tab:blue")
        ax.bar([i + 0.2 for i in x], theirs, 0.4, label="llama-batched-bench", color="tab:orange")
        ax.set_xticks(x, bs)
        ax.set_xlabel("sequences per decode (B)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("Engine only, no HTTP: 32-token prompts, 48 new tokens")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "engine.png", dpi=110)
        plt.close(fig)


def update_readme(readme: Path, table: str) -> None:
    if not readme.exists():
        return
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")


def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results)
    (out / "results.md").write_text(md)
    plots(results, out)
    # Only the default full run's results are the README's (not a run written elsewhere).
    if results["meta"]["mode"] == "full" and out.resolve() == DEFAULT_OUT:
        body = md.split("\n", 2)[2].replace("\n## ", "\n### ")
        update_readme(out.parent / "README.md", body)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    results = json.loads((out / "results.json").read_text())
    write_report(results, out)
    print(f"wrote {out}/results.md and plots")


if __name__ == "__main__":
    main()
