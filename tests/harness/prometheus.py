"""A real Prometheus (Debian's ``/usr/bin/prometheus``, from ``make system-deps``) on loopback.

Targets come from ``file_sd_configs``: :meth:`Prometheus.add_targets` writes one JSON file per
job, so tests add and remove targets while Prometheus runs (it notices within a few seconds).
Scrapes and rule evaluations run every second.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.harness import REPO_ROOT, free_port, wait_port_free, wait_until
from tests.harness.process import ManagedProcess

PROMETHEUS_BINARY = Path(os.environ.get("LLAMAHERD_PROMETHEUS", "/usr/bin/prometheus"))
Sample = dict[str, Any]  # one element of a PromQL vector: {"metric": {...}, "value": [ts, "v"]}


class Prometheus:
    """Prometheus with a file-discovered scrape job, a 1s scrape interval and a tmp TSDB."""

    def __init__(
        self,
        *,
        binary: Path = PROMETHEUS_BINARY,
        logs_dir: Path | None = None,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
    ) -> None:
        self.binary = binary
        self.scrape_interval = scrape_interval
        self.rule_files = list(rule_files)
        self.workdir = Path(tempfile.mkdtemp(prefix="llamaherd-prom-"))
        self.targets_dir = self.workdir / "targets"
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        self.logs_dir = logs_dir or REPO_ROOT / ".artifacts" / "prometheus-logs" / stamp
        self.port = 0
        self._process: ManagedProcess | None = None
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.logs_dir / "prometheus.log"

    def start(self, timeout: float = 60) -> Prometheus:
        """Start Prometheus and wait for ``/-/ready``."""
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(
                f"{self.binary} is missing: run `make system-deps` (Debian's prometheus package)"
            )
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self._config(), indent=2) + "\n")  # JSON is YAML
        self.port = free_port()
        argv = [
            str(self.binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1h",
        ]
        self._process = ManagedProcess(
            argv,
            self.log,
            name="prometheus",
            cwd=None,
            stop_timeout_s=15.0,
            append=True,
            new_session=True,
        ).start()
        self._client = httpx.Client(base_url=self.url, timeout=5)
        try:
            self._process.wait_ready(self._ready, timeout_s=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the process group, check the port is free, drop the TSDB (logs stay)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            self._process.stop()
            self._process = None
            wait_port_free(self.port)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        return f"Prometheus {self.url}, log {self.log}"

    # targets

    def add_targets(
        self,
        job: str,
        targets: Sequence[str],
        labels: Mapping[str, str] | None = None,
        metrics_path: str = "/metrics",
    ) -> None:
        """Scrape ``targets`` (``host:port``) as ``job``; replaces the job's earlier targets."""
        group_labels = {"job": job, "__metrics_path__": metrics_path, **(labels or {})}
        groups = [{"targets": list(targets), "labels": group_labels}]
        tmp = self.targets_dir / f".{job}.tmp"
        tmp.write_text(json.dumps(groups))
        tmp.rename(self.targets_dir / f"{job}.json")  # atomic: Prometheus never sees half a file

    def remove_targets(self, job: str) -> None:
        (self.targets_dir / f"{job}.json").unlink(missing_ok=True)

    # queries

    def query(self, promql: str) -> list[Sample]:
        """Evaluate an instant query; returns the vector (``data.result``)."""
        assert self._client is not None, "Prometheus not started"
        resp = self._client.get("/api/v1/query", params={"query": promql})
        body = resp.json()
        if resp.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"PromQL {promql!r} failed: {resp.status_code} {body}")
        result = body["data"]["result"]
        return list(result) if isinstance(result, list) else [{"metric": {}, "value": result}]

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Sample]], bool] = bool,
        timeout: float = 30,
    ) -> list[Sample]:
        """Poll ``promql`` until ``predicate(result)`` holds; returns that result."""
        return wait_until(
            lambda: (result := self.query(promql)) and predicate(result) and result,
            timeout=timeout,
            interval=0.5,
            what=f"PromQL {promql!r} ({self.describe()})",
        )

    def _ready(self) -> bool:
        assert self._client is not None
        return self._client.get("/-/ready").status_code == 200

    def _config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": "file-sd",
                    "file_sd_configs": [
                        {"files": [f"{self.targets_dir}/*.json"], "refresh_interval": "1s"}
                    ],
                }
            ],
        }


def sample_value(sample: Sample) -> float:
    """The float value of one vector sample."""
    return float(sample["value"][1])
