"""Every metric the dashboard, the alerts and the autoscaler's PromQL read is one that the server
or the operator exports: by the contract modules (``exported_names()``) and by a real scrape.

A name counts only as a series a scrape can show: ``llamaherd_requests`` (a counter's family
name) does not, ``llamaherd_requests_total`` does; ``_bucket`` only exists for a histogram.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from llamaherd_gateway import metrics as gateway_metrics
from llamaherd_operator import metrics as operator_metrics
from llamaherd_operator.prom import DEFAULT_SELECTOR, Queries, held_query, selector_for
from llamaherd_server import metrics as server_metrics
from tests.chart.conftest import VALUES, Objects
from tests.chart.promql import PromQLSyntaxError, metric_names, tokens
from tests.conftest import start_server
from tests.harness import REPO_ROOT

DASHBOARDS = sorted((REPO_ROOT / "monitoring" / "grafana").glob("*.json"))
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "gauge": ("",),
    "unknown": ("",),
    "info": ("_info",),
}


def series_names(families: Iterable[Metric]) -> set[str]:
    """Every series name a scrape of these families can show, with or without samples yet."""
    names: set[str] = set()
    for family in families:
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def scraped_names(text: str) -> set[str]:
    return series_names(text_string_to_metric_families(text))


# --- where the expressions are -------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = list(dashboard["panels"])
        for panel in dashboard["panels"]:
            panels.extend(panel.get("panels", []))
        exprs += [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            if variable.get("type") == "query" and query:
                # label_values(<selector>, label) is Grafana's, not PromQL: keep the selector.
                inner = query.removeprefix("label_values(").rsplit(",", 1)[0]
                exprs.append(inner)
    return exprs


def alert_exprs(render: Callable[..., Objects]) -> list[str]:
    (rule,) = [o for o in render(VALUES["all-on"]) if o["kind"] == "PrometheusRule"]
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def operator_exprs() -> list[str]:
    queries = Queries.for_selector(selector_for(DEFAULT_SELECTOR, "ns", "svc"), 60).all()
    return [*queries, held_query("ns", "svc")]


def used_names(exprs: list[str]) -> set[str]:
    names: set[str] = set()
    for expr in exprs:
        names |= metric_names(expr)
    return names


@pytest.fixture(scope="module")
def sources(render: Callable[..., Objects]) -> dict[str, set[str]]:
    return {
        "dashboard": used_names(dashboard_exprs()),
        "alerts": used_names(alert_exprs(render)),
        "operator PromQL": used_names(operator_exprs()),
    }


def contract_series() -> set[str]:
    registries = [
        server_metrics.ServerMetrics(slots=1).registry,
        operator_metrics.OperatorMetrics().registry,
        gateway_metrics.GatewayMetrics().registry,
    ]
    return series_names(family for r in registries for family in r.collect())


def check(used: dict[str, set[str]], known: set[str], what: str) -> None:
    missing = {f"{source}: {name}" for source, names in used.items() for name in names - known}
    assert not missing, f"not in {what}: {sorted(missing)}"


# --- the tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('rate(a_total{job="x",le=~"1|2"}[5m])', {"a_total"}),
        ("sum by (le, namespace) (rate(h_bucket[$__rate_interval]))", {"h_bucket"}),
        (
            "sum(rate(h_bucket[5m])) by (le) > on (pod) group_left(node) info_metric",
            {"h_bucket", "info_metric"},
        ),
        ("a and on (namespace, pod) b == 1 unless ignoring(x) c", {"a", "b", "c"}),
        ('label_replace(max by (service) (r), "dst", "$1", "service", "(.*)")', {"r"}),
        (
            "histogram_quantile(0.95, sum without (pod) (rate(x_bucket[1m] offset 5m)))",
            {"x_bucket"},
        ),
        ('count_values("v", g) > bool 2 * -1e3', {"g"}),
        ('absent(m{a="sum(b)"})', {"m"}),
        ("topk(3, foo:recording_rule)", {"foo:recording_rule"}),
    ],
)
def test_promql_tokenizer(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_promql_tokenizer_refuses_unknown_functions_and_garbage() -> None:
    with pytest.raises(PromQLSyntaxError):
        metric_names("rates(x[5m])")
    with pytest.raises(PromQLSyntaxError):
        metric_names("sum(x{a='b'")
    with pytest.raises(PromQLSyntaxError):
        tokens("x ~ y")


def test_series_names_are_careful_with_suffixes() -> None:
    known = contract_series()
    assert "llamaherd_requests_total" in known and "llamaherd_requests" not in known
    assert "llamaherd_batch_size_bucket" in known and "llamaherd_ready_bucket" not in known
    assert "llamaherd_operator_desired_replicas" in known  # a labelled gauge with no sample yet


# --- the checks ----------------------------------------------------------------------------------


@pytest.mark.tools
def test_every_source_reads_llamaherd_metrics(sources: dict[str, set[str]]) -> None:
    for source, names in sources.items():
        assert any(n.startswith("llamaherd_") for n in names), f"{source} reads no llamaherd metric"


@pytest.mark.tools
def test_names_are_in_the_contract_modules(sources: dict[str, set[str]]) -> None:
    exported = (
        server_metrics.exported_names()
        | operator_metrics.exported_names()
        | gateway_metrics.exported_names()
    )
    check(sources, exported, "server, operator or gateway exported_names()")
    check(sources, contract_series(), "the series the two registries can show")


@pytest.mark.tools
def test_names_are_in_a_scrape_of_the_operator_registry(sources: dict[str, set[str]]) -> None:
    operator_text = generate_latest(operator_metrics.OperatorMetrics().registry).decode()
    operator_series = scraped_names(operator_text)
    operator_used = {
        source: {n for n in names if n.startswith("llamaherd_operator_")}
        for source, names in sources.items()
    }
    check(operator_used, operator_series, "a scrape of OperatorMetrics().registry")


@pytest.mark.server
@pytest.mark.tools
def test_names_are_in_a_scrape_of_a_real_server(
    sources: dict[str, set[str]], tiny_model: Path, tmp_path: Path
) -> None:
    server = start_server(tiny_model, tmp_path)
    try:
        # One request, so that the labelled series (waiting by priority, outcomes) have samples.
        body = {"prompt": "hello", "max_tokens": 4, "temperature": 0.0}
        assert httpx.post(server.url + "/v1/generate", json=body, timeout=60).status_code == 200
        response = httpx.get(server.url + "/metrics", timeout=10)
        assert response.status_code == 200
        text = response.text
    finally:
        server.stop()
    scraped = scraped_names(text)
    operator_series = scraped_names(
        generate_latest(operator_metrics.OperatorMetrics().registry).decode()
    )
    # Samples seen for real in the server's scrape, not only declared families.
    sample_names = {
        s.name for family in text_string_to_metric_families(text) for s in family.samples
    }
    server_used = {
        source: {
            n for n in names if not n.startswith(("llamaherd_operator_", "llamaherd_gateway_"))
        }
        for source, names in sources.items()
    }
    check(server_used, sample_names, "the samples of a real server's /metrics")
    gateway_series = gateway_metrics.exported_names()
    check(
        sources,
        scraped | operator_series | gateway_series,
        "a real server's, the operator's and the gateway's /metrics",
    )


# --- PromQL that Prometheus itself parses -------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.tools
def test_alert_rules_pass_promtool(render: Callable[..., Objects], tmp_path: Path) -> None:
    for values in (None, VALUES["all-on"]):
        objects = render(values, "--set", "monitoring.prometheusRule.enabled=true")
        (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
        path = tmp_path / "rules.yaml"
        path.write_text(yaml.safe_dump(rule["spec"]))
        proc = promtool("check", "rules", str(path))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    generated = REPO_ROOT / "monitoring" / "alerts" / "llamaherd.rules.yaml"
    proc = promtool("check", "rules", str(generated))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.tools
def test_dashboard_queries_parse_in_promtool(tmp_path: Path) -> None:
    """Each dashboard query as a recording rule, Grafana's variables replaced by values."""
    replacements = {
        "$__rate_interval": "5m",
        "${datasource}": "prometheus",
        "$namespace": ".*",
        "$service": ".*",
    }
    rules: list[dict[str, Any]] = []
    for index, expr in enumerate(dashboard_exprs()):
        for variable, value in replacements.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr.replace('"$1"', ""), f"unknown Grafana variable in {expr}"
        rules.append({"record": f"llamaherd:dashboard_query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


DESIRED = operator_metrics.DESIRED_REPLICAS


@pytest.mark.tools
def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    """promtool test rules: the queue, absent-metrics and not-ready alerts fire when they should."""
    # promtool compares annotations too; these tests are about the expressions.
    spec = yaml.safe_load(
        (REPO_ROOT / "monitoring" / "alerts" / "llamaherd.rules.yaml").read_text()
    )
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(spec))
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'llamaherd_requests_waiting{namespace="a",service="s",pod="p1"}',
                        "values": "20x30",
                    },
                    {
                        "series": 'llamaherd_ready{namespace="a",service="s",pod="p1"}',
                        "values": "1x30",
                    },
                    {
                        "series": 'llamaherd_ready{namespace="a",service="s",pod="p2"}',
                        "values": "0x30",
                    },
                    {
                        "series": DESIRED + '{namespace="b",inferenceservice="t"}',
                        "values": "2x30",
                    },
                    {
                        "series": DESIRED + '{namespace="a",inferenceservice="s"}',
                        "values": "2x30",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": "LlamaherdQueueDepthHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": "a",
                                    "service": "s",
                                }
                            }
                        ],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "LlamaherdMetricsAbsent",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": "b",
                                    "inferenceservice": "t",
                                }
                            }
                        ],
                    },
                    {
                        "eval_time": "20m",
                        "alertname": "LlamaherdServerNotReady",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": "a",
                                    "service": "s",
                                    "pod": "p2",
                                }
                            }
                        ],
                    },
                    {"eval_time": "5m", "alertname": "LlamaherdQueueDepthHigh", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "LlamaherdGatewayHoldsFail",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": "gw",
                                    "model": "m",
                                }
                            }
                        ],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "LlamaherdGatewayUpstreamUnavailable",
                        "exp_alerts": [],
                    },
                ],
            }
        ],
    }
    # a gateway turning requests away with 503 (holds timing out) for 30 minutes; every other
    # outcome flat
    gateway = 'llamaherd_gateway_requests_total{namespace="gw",model="m",outcome="%s"}'
    tests["tests"][0]["input_series"] += [  # type: ignore[index]
        {"series": gateway % "hold_timeout", "values": "0+2x30"},
        {"series": gateway % "unavailable", "values": "0x30"},
        {"series": gateway % "ok", "values": "0+5x30"},
    ]
    path = tmp_path / "alerts-test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = promtool("test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
