"""The OCI runtime wrapper that lets kind's `docker run --privileged` work without CAP_SYS_RESOURCE.

The wrapper (hack/kind/runc-wrapper) is built with Go and run in front of a stand-in "runc" that
records its arguments: this tests the wrapper's own logic (which file it edits, what it removes,
that it hands every argument over unchanged), not runc. Whether Docker and kind work through it is
what the e2e suite shows.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

SOURCE = REPO_ROOT / "hack" / "kind" / "runc-wrapper"
ALL_CAPS = ["CAP_CHOWN", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"]

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="needs Go to build the wrapper")


def host_lacks_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return not (int(line.split()[1], 16) >> 24) & 1
    raise AssertionError("no CapBnd in /proc/self/status")


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wrapper") / "llamaherd-runc"
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false", "GOTOOLCHAIN": "local"}
    subprocess.run(["go", "build", "-o", str(out), "."], cwd=SOURCE, env=env, check=True)
    return out


@pytest.fixture
def fake_runc(tmp_path: Path) -> tuple[Path, Path]:
    """A "runc" that writes its arguments, one per line, to a file."""
    record = tmp_path / "args"
    script = tmp_path / "runc"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, record


def capabilities(sets: list[str]) -> dict[str, list[str]]:
    return {name: list(sets) for name in ("bounding", "effective", "permitted")}


def run_wrapper(wrapper: Path, runc: Path, args: list[str]) -> None:
    env = {**os.environ, "LLAMAHERD_RUNC": str(runc)}
    subprocess.run([str(wrapper), *args], env=env, check=True, timeout=30)


def expected_caps() -> list[str]:
    if host_lacks_sys_resource():
        return [cap for cap in ALL_CAPS if cap != "CAP_SYS_RESOURCE"]
    return ALL_CAPS


def test_create_edits_the_bundle_config_and_passes_arguments_through(
    wrapper: Path, fake_runc: tuple[Path, Path], tmp_path: Path
) -> None:
    runc, record = fake_runc
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = {"ociVersion": "1.0.2", "process": {"capabilities": capabilities(ALL_CAPS)}}
    (bundle / "config.json").write_text(json.dumps(config))
    args = ["--root", "/run/x", "--log", "/tmp/log.json", "--log-format", "json", "create"]
    args += ["--bundle", str(bundle), "--pid-file", "/tmp/pid", "container-id"]

    run_wrapper(wrapper, runc, args)

    assert record.read_text().splitlines() == args
    written = json.loads((bundle / "config.json").read_text())
    assert written["ociVersion"] == "1.0.2"
    for caps in written["process"]["capabilities"].values():
        assert caps == expected_caps()


def test_exec_edits_the_process_file(
    wrapper: Path, fake_runc: tuple[Path, Path], tmp_path: Path
) -> None:
    runc, record = fake_runc
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sh"], "capabilities": capabilities(ALL_CAPS)}))
    args = ["--root", "/run/x", "exec", "--process", str(process), "--detach", "container-id"]

    run_wrapper(wrapper, runc, args)

    assert record.read_text().splitlines() == args
    written = json.loads(process.read_text())
    assert written["args"] == ["sh"]
    assert written["capabilities"]["bounding"] == expected_caps()


def test_other_commands_touch_no_file(
    wrapper: Path, fake_runc: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runc, record = fake_runc
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    text = json.dumps({"process": {"capabilities": capabilities(ALL_CAPS)}})
    (bundle / "config.json").write_text(text)
    monkeypatch.chdir(
        bundle
    )  # runc's default bundle is the working directory; `start` must not use it

    run_wrapper(wrapper, runc, ["start", "container-id"])

    assert record.read_text().splitlines() == ["start", "container-id"]
    assert (bundle / "config.json").read_text() == text
