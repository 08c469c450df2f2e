"""The two container images, built by ``make images`` (hack/images.sh), run for real.

The server image serves a generated model mounted from the host on a loopback-published port,
as a non-root user, and its HEALTHCHECK turns healthy; the operator image imports its package
as a non-root user without llama-cpp-python. The CUDA variant's stages are checked here and
BuildKit builds its toolchain stage; test_cuda_image.py runs the built CUDA image.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import free_port

pytestmark = [pytest.mark.slow, pytest.mark.images]

REPO = Path(__file__).resolve().parents[2]
SERVER_IMAGE = os.environ.get("LLAMAHERD_SERVER_IMAGE", "llamaherd-server:cpu")
OPERATOR_IMAGE = os.environ.get("LLAMAHERD_OPERATOR_IMAGE", "llamaherd-operator:dev")
BUILD_HINT = "run `make images` (hack/images.sh starts dockerd and builds the images)"
ALLOWED_NET = ipaddress.ip_network("198.18.0.0/15")


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


@pytest.fixture(scope="module")
def docker_engine() -> None:
    if shutil.which("docker") is None:
        pytest.fail(f"the docker CLI is not installed: {BUILD_HINT}")
    info = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    if info.returncode != 0:
        pytest.fail(f"no Docker engine answers ({info.stderr.strip()}): {BUILD_HINT}")


def inspect_image(name: str) -> dict:
    result = docker("image", "inspect", name, check=False)
    if result.returncode != 0:
        pytest.fail(f"image {name} is missing: {BUILD_HINT}")
    return json.loads(result.stdout)[0]


@pytest.fixture(scope="module")
def server_image(docker_engine: None) -> dict:
    return inspect_image(SERVER_IMAGE)


@pytest.fixture(scope="module")
def operator_image(docker_engine: None) -> dict:
    return inspect_image(OPERATOR_IMAGE)


def env_of(image: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in image["Config"]["Env"])


def is_non_root(user: str) -> bool:
    name = user.split(":", 1)[0]
    return name not in ("", "0", "root")


# --- server image -------------------------------------------------------------------------


def test_server_image_config(server_image: dict) -> None:
    config = server_image["Config"]
    assert is_non_root(config["User"]), config["User"]
    assert config["User"].split(":")[0].isdigit(), "numeric user, so runAsNonRoot can check it"
    assert config["Entrypoint"] == ["python", "-m", "llamaherd_server"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert config["Labels"]["io.llamaherd.variant"] == "cpu"
    env = env_of(server_image)
    assert env["LLAMAHERD_MODEL"].startswith("/models/")
    assert env["LLAMAHERD_PORT"] == "8000"


def test_server_image_has_no_model_and_no_build_tools(server_image: dict) -> None:
    found = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", SERVER_IMAGE, "-c",
        "find / -xdev -name '*.gguf' -print; command -v gcc cmake || true",
    )  # fmt: skip
    assert found.stdout.strip() == "", found.stdout


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A generated tiny model in a directory the container's user can read."""
    directory = tmp_path / "models"
    directory.mkdir()
    subprocess.run(
        [sys.executable, "-m", "llamaherd_server.ggufgen", "--preset", "tiny",
         "--out", str(directory / "tiny.gguf")],
        check=True, timeout=120,
    )  # fmt: skip
    directory.chmod(0o755)
    (directory / "tiny.gguf").chmod(0o644)
    return directory


@contextlib.contextmanager
def run_server(image: str, model_dir: Path, name_prefix: str) -> Iterator[tuple[str, str]]:
    """A detached server container of ``image`` serving the tiny model on a loopback port:
    (container name, base URL); its last log lines are printed and it is removed after."""
    bridge = json.loads(docker("network", "inspect", "bridge").stdout)[0]
    for pool in bridge["IPAM"]["Config"]:
        assert ipaddress.ip_network(pool["Subnet"]).subnet_of(ALLOWED_NET), (
            f"docker's bridge uses {pool['Subnet']}, outside 198.18.0.0/15: restart dockerd "
            f"with --bip (hack/images.sh does)"
        )
    port = free_port()
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    docker(
        "run", "-d", "--name", name,
        "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{model_dir}:/models:ro",
        "-e", "LLAMAHERD_MODEL=/models/tiny.gguf",
        "-e", "LLAMAHERD_SLOTS=2",
        "-e", "LLAMAHERD_THREADS=2",
        "-e", "LLAMAHERD_CONTEXT_SIZE=256",
        image,
    )  # fmt: skip
    try:
        yield name, f"http://127.0.0.1:{port}"
    finally:
        logs = docker("logs", "--tail", "50", name, check=False)
        print(f"--- docker logs {name}\n{logs.stdout}{logs.stderr}")
        docker("rm", "-f", name, check=False)


@pytest.fixture
def server_container(server_image: dict, model_dir: Path) -> Iterator[tuple[str, str]]:
    with run_server(SERVER_IMAGE, model_dir, "llamaherd-test") as running:
        yield running


def wait_ready(name: str, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        if not state["Running"]:
            logs = docker("logs", name, check=False)
            raise AssertionError(f"container exited {state['ExitCode']}:\n{logs.stderr}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"server in {name} not ready after {timeout}s")


def test_server_container_serves_a_mounted_model(server_container: tuple[str, str]) -> None:
    name, url = server_container
    wait_ready(name, url)

    assert httpx.get(url + "/health", timeout=5).status_code == 200
    response = httpx.post(
        url + "/v1/completions",
        # Greedy: sampled, the random tiny model ends at once (first token EOS) in about 1
        # request in 1000, and the test wants generated tokens.
        json={"prompt": "Hello", "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] >= 1
    assert "llamaherd_" in httpx.get(url + "/metrics", timeout=5).text

    uid = docker("exec", name, "id", "-u").stdout.strip()
    assert uid != "0"

    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        status = docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
        if status == "healthy":
            break
        assert status in ("starting", "healthy"), status
        time.sleep(1)
    assert status == "healthy"


# --- operator image -----------------------------------------------------------------------


def test_operator_image_imports_as_non_root(operator_image: dict) -> None:
    """The operator and the gateway (the chart runs it from this image) both import."""
    config = operator_image["Config"]
    assert is_non_root(config["User"]), config["User"]
    assert config["Entrypoint"] == ["python", "-m", "llamaherd_operator"]
    probe = (
        "import importlib.util, os, kopf, lightkube, llamaherd_operator.__main__; "
        "import aiohttp, uvicorn, uvloop, httptools, llamaherd_gateway.__main__; "
        "assert importlib.util.find_spec('llama_cpp') is None, 'llama-cpp-python installed'; "
        "print(os.getuid())"
    )
    result = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "python", OPERATOR_IMAGE, "-c", probe
    )  # fmt: skip
    assert result.stdout.strip() not in ("", "0"), result.stdout


# --- CUDA variant and build arguments -----------------------------------------------------


def logical_lines(dockerfile: Path) -> list[str]:
    """Instructions with their continuation lines joined; comments and blanks dropped."""
    lines: list[str] = []
    current = ""
    for raw in dockerfile.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, f"{dockerfile.name} ends inside a continued line"
    return lines


INSTRUCTIONS = {
    "FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "LABEL",
    "HEALTHCHECK", "ENTRYPOINT", "CMD", "VOLUME", "SHELL", "STOPSIGNAL", "ONBUILD",
}  # fmt: skip


def stages(dockerfile: Path, build_args: dict[str, str]) -> list[tuple[str, str]]:
    """(base, name) of every stage, with ARGs from before the first FROM expanded."""
    global_args: dict[str, str] = {}
    result: list[tuple[str, str]] = []
    for line in logical_lines(dockerfile):
        keyword, _, rest = line.partition(" ")
        assert keyword.upper() in INSTRUCTIONS, f"{dockerfile.name}: unknown instruction {line!r}"
        if keyword == "ARG" and not result:
            key, _, default = rest.partition("=")
            global_args[key] = build_args.get(key, default.strip('"'))
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            result.append((base, name))
    return result


@pytest.mark.parametrize("variant", ["cuda", "cpu"])
def test_server_stage_graph(variant: str) -> None:
    found = stages(REPO / "Dockerfile.server", {"VARIANT": variant})
    names = [name for _, name in found]
    for index, (base, _) in enumerate(found):
        if base in names:
            assert names.index(base) < index, f"stage {index} uses {base} before it is defined"
    bases = {name: base for base, name in found}
    assert bases["builder"] == f"builder-{variant}"
    # No nvidia/cuda image: CUDA comes from PyPI, so a plain Debian base does.
    assert bases["builder-base"] == "debian:bookworm"
    assert bases["runtime"] == "debian:bookworm-slim"
    assert found[-1][0] == f"runtime-{variant}"


def test_cuda_is_the_default_variant() -> None:
    text = (REPO / "Dockerfile.server").read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S*)", text, re.MULTILINE))
    assert defaults["VARIANT"] == "cuda"
    cuda_stage = text.split("AS builder-cuda", 1)[1].split("FROM ", 1)[0]
    assert "-DGGML_CUDA=on" in cuda_stage
    assert "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" in cuda_stage
    # Ampere, Ada and Hopper, as real (SASS) code, by default.
    archs = re.search(r'ARG CUDA_ARCHITECTURES="([^"]+)"', cuda_stage)
    assert archs and archs.group(1).split(";") == ["80-real", "89-real", "90-real"]
    for package in ("nvidia-cuda-nvcc==", "nvidia-cublas==", "nvidia-cuda-runtime=="):
        assert package in cuda_stage, package
    cpu_stage = text.split("AS builder-cpu", 1)[1].split("FROM ", 1)[0]
    assert "-DGGML_NATIVE=OFF" in cpu_stage
    pin = re.search(r'"llama-cpp-python==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert pin and defaults["LLAMA_CPP_PYTHON_VERSION"] == pin.group(1)


def test_host_wheel_has_the_cpu_image_flags() -> None:
    """hack/llama-wheel.sh compiles the host's wheel with the CPU image's flags, so that the image
    build may install it instead of compiling again, and the benchmark's llama-server gets the
    same; they must not drift apart."""
    pinned = (REPO / "hack" / "llama.env").read_text()
    flags = re.search(r'^LLAMA_CPU_CMAKE_ARGS="([^"]*)"', pinned, re.MULTILINE)
    script = (REPO / "hack" / "llama-wheel.sh").read_text()
    assert "CMAKE_ARGS=${CMAKE_ARGS-$LLAMA_CPU_CMAKE_ARGS}" in script
    bench = (REPO / "bench" / "build_llama_server.sh").read_text()
    assert "${CMAKE_ARGS-$LLAMA_CPU_CMAKE_ARGS}" in bench
    text = (REPO / "Dockerfile.server").read_text()
    cpu_stage = text.split("AS builder-cpu", 1)[1].split("FROM ", 1)[0]
    env = re.search(r'ENV LLAMA_CMAKE_ARGS="([^"]*)"', cpu_stage)
    assert flags and env, "LLAMA_CPU_CMAKE_ARGS or the builder-cpu stage's LLAMA_CMAKE_ARGS is gone"
    assert flags.group(1) == env.group(1)
    # The image takes the host's wheel only for the CPU variant with no extra flags.
    builder = text.split("AS builder\n", 1)[1].split("FROM ", 1)[0]
    assert '[ "$VARIANT" = cpu ] && [ -z "$LLAMA_CMAKE_EXTRA_ARGS" ]' in builder


def test_cuda_variant_parses_with_buildkit(docker_engine: None) -> None:
    """BuildKit parses every stage; builder-cuda is cheap on the cached local base."""
    result = subprocess.run(
        ["bash", str(REPO / "hack" / "images.sh"), "check-cuda"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-4000:]}{result.stderr[-4000:]}"


# --- compose -----------------------------------------------------------------------------


def test_compose_file() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    server = compose["services"]["server"]
    assert server["build"]["dockerfile"] == "Dockerfile.server"
    assert server["build"]["args"]["VARIANT"] == "${LLAMAHERD_VARIANT:-cpu}"
    assert "./models:/models:ro" in server["volumes"]
    assert all(p.startswith("127.0.0.1:") for s in compose["services"].values() for p in s["ports"])
    assert compose["services"]["prometheus"]["image"].startswith("prom/prometheus")
    assert compose["services"]["grafana"]["image"].startswith("grafana/grafana")
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./monitoring"):
                assert volume.endswith(":ro"), volume
                # Dashboards and alert rules belong to other files; their folders may be empty.
                optional = source in ("./monitoring/grafana", "./monitoring/alerts")
                assert optional or (REPO / source).exists(), source

    prometheus = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]]  # fmt: skip
    assert "server:8000" in targets
    provisioning = REPO / "monitoring" / "grafana-provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def compose_command() -> list[str]:
    """Debian's docker-compose 1.29, or the compose plugin of the docker CLI, or nothing."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    plugin = ["docker", "compose"]
    if shutil.which("docker") and subprocess.run(
        [*plugin, "version"], capture_output=True, check=False
    ).returncode == 0:  # fmt: skip
        return plugin
    return []


def test_compose_and_prometheus_configs_validate() -> None:
    ran = []
    compose = compose_command()
    if compose:
        cmd = [*compose, "-f", "compose.yaml", "config", "--quiet"]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        ran.append("compose")
    if shutil.which("promtool"):
        result = subprocess.run(
            ["promtool", "check", "config", "monitoring/prometheus.yml"],
            cwd=REPO, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        ran.append("promtool")
    if not ran:
        pytest.skip("neither a compose CLI nor promtool is installed (test_compose_file ran)")
