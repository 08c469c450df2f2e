"""The container's CPU and memory budget from cgroup files (fixture trees of both versions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaherd_server.cpus import cgroup_cpu_quota, cgroup_memory_limit, cpu_budget
from llamaherd_server.settings import ServerSettings


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000"}, None),
        ({"cpu.max": "200000 100000"}, 2.0),
        ({"cpu.max": "150000 100000"}, 1.5),
        ({"cpu.max": "50000 100000"}, 0.5),
        ({"cpu.max": "garbage"}, None),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "250000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            2.5,
        ),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    assert cgroup_cpu_quota(tree(tmp_path, files)) == quota


@pytest.mark.parametrize(
    ("files", "affinity", "threads", "source"),
    [
        # A 2-CPU limit on a 64-core node: 2, not 64.
        ({"cpu.max": "200000 100000"}, 64, 2, "cgroup CPU quota 2"),
        # Fractions round up, at least 1.
        ({"cpu.max": "150000 100000"}, 64, 2, "cgroup CPU quota 1.5"),
        ({"cpu.max": "10000 100000"}, 64, 1, "cgroup CPU quota 0.1"),
        # The affinity mask when it is the smaller (cpuset, taskset).
        ({"cpu.max": "800000 100000"}, 3, 3, "CPU affinity, 3 CPUs"),
        ({"cpu.max": "max 100000"}, 4, 4, "CPU affinity, 4 CPUs"),
        (
            {"cpu/cpu.cfs_quota_us": "400000", "cpu/cpu.cfs_period_us": "100000"},
            16,
            4,
            "cgroup CPU quota 4",
        ),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 6, 6, "CPU affinity"),
    ],
)
def test_cpu_budget(
    tmp_path: Path, files: dict[str, str], affinity: int, threads: int, source: str
) -> None:
    got, where = cpu_budget(tree(tmp_path, files), affinity=affinity)
    assert got == threads
    assert where.startswith(source)


def test_cpu_budget_without_quota_or_affinity_is_the_core_count(tmp_path: Path) -> None:
    assert cpu_budget(tmp_path, affinity=0, cpu_count=12) == (12, "os.cpu_count()")


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"memory.max": "max"}, None),
        ({"memory.max": "2147483648"}, 2 << 30),
        ({"memory/memory.limit_in_bytes": "1073741824"}, 1 << 30),
        ({"memory/memory.limit_in_bytes": "9223372036854771712"}, None),
        ({}, None),
    ],
)
def test_cgroup_memory_limit(tmp_path: Path, files: dict[str, str], limit: int | None) -> None:
    assert cgroup_memory_limit(tree(tmp_path, files)) == limit


def test_threads_setting_unset_or_zero_means_the_cpu_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert ServerSettings(model=model, threads=3).resolved_threads() == (3, "setting")
    for unset in ({}, {"threads": 0}):
        settings = ServerSettings(model=model, **unset)  # type: ignore[arg-type]
        assert settings.threads is None
        threads, where = settings.resolved_threads()
        assert threads >= 1 and where != "setting"
    monkeypatch.setenv("LLAMAHERD_THREADS", "0")
    assert ServerSettings(model=model).threads is None
    monkeypatch.setenv("LLAMAHERD_THREADS", "5")
    assert ServerSettings(model=model).threads == 5
    with pytest.raises(ValueError, match="threads"):
        ServerSettings(model=model, threads=-1)
