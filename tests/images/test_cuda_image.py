"""The CUDA server image (``make image-server-cuda``) on a machine without a GPU.

The image is built here from the local Debian base with CUDA 13 from PyPI. Its cold build
compiles llama.cpp's CUDA kernels for three GPU architectures (about an hour and a half on 2
cores), so ``make test`` does not build it: these tests run where the image exists and say how
to build it where it does not. Without the NVIDIA driver the image falls back to a stand-in
``libcuda.so.1`` (see llamaherd_server/cudadriver.py): CUDA finds no device, /health says so,
and llama.cpp serves on the CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.images.test_images import (  # noqa: F401
    docker,
    env_of,
    model_dir,
    run_server,
    wait_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.images]

CUDA_IMAGE = os.environ.get("LLAMAHERD_SERVER_CUDA_IMAGE", "llamaherd-server:cuda")


@pytest.fixture(scope="module")
def cuda_image() -> dict:
    found = docker("image", "inspect", CUDA_IMAGE, check=False)
    if found.returncode != 0:
        pytest.skip(
            f"{CUDA_IMAGE} is not built: `make image-server-cuda` builds it (a cold build "
            "compiles CUDA kernels for about an hour and a half on 2 cores, so `make test` "
            "leaves it out; a repeat takes seconds)"
        )
    return json.loads(found.stdout)[0]


def test_cuda_image_config(cuda_image: dict) -> None:
    config = cuda_image["Config"]
    assert config["Labels"]["io.llamaherd.variant"] == "cuda"
    assert config["User"].split(":")[0] not in ("", "0", "root")
    env = env_of(cuda_image)
    assert env["LLAMAHERD_GPU_LAYERS"] == "-1", "all layers on the GPU by default"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    # The CUDA backend is really in it, with cuBLAS and cudart found by the loader, and no
    # driver of its own on the loader's path (the node brings the real one). libggml-cuda.so
    # records no libcuda.so.1 (the linker dropped the empty stub it linked against): its driver
    # functions resolve from the driver that llamaherd_server.cudadriver loads globally first.
    probe = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", CUDA_IMAGE, "-c",
        "lib=$(python -c 'import importlib.util, os; "
        "print(os.path.dirname(importlib.util.find_spec(\"llama_cpp\").origin))')/lib; "
        "ls $lib; ldd $lib/libggml-cuda.so; ldconfig -p | grep -c libcuda.so.1 || true; "
        "command -v nvcc gcc || true",
    )  # fmt: skip
    out = probe.stdout
    assert "libggml-cuda.so" in out, out
    assert "libcublas.so.13 => /" in out and "libcudart.so.13 => /" in out, out
    assert "not found" not in out, out
    assert out.rstrip().splitlines()[-1] == "0", "no libcuda.so.1 registered in the image"
    assert "/nvcc" not in out and "/gcc" not in out, "no build tools in the runtime image"


@pytest.fixture
def cuda_container(cuda_image: dict, model_dir: Path) -> Iterator[tuple[str, str]]:  # noqa: F811
    with run_server(CUDA_IMAGE, model_dir, "llamaherd-test-cuda") as running:
        yield running


def test_without_a_gpu_the_cuda_image_serves_on_the_cpu(cuda_container: tuple[str, str]) -> None:
    name, url = cuda_container
    wait_ready(name, url, timeout=180)
    health = httpx.get(url + "/health", timeout=5).json()
    gpu = health["gpu"]
    assert gpu["backend"] == "cpu" and gpu["devices"] == [], gpu
    assert gpu["gpu_layers"] == 0, "the image asks for every layer; with no GPU none moved"
    assert "no NVIDIA driver" in gpu["note"], gpu
    assert health["gpu_utilization"] is None
    response = httpx.post(
        url + "/v1/generate",
        # Greedy: sampled, the random tiny model ends at once (first token EOS) in about 1
        # request in 1000, and the test wants generated tokens.
        json={"prompt": "Hello", "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["tokens_generated"] >= 1, response.json()
    logs = docker("logs", name).stderr
    assert "no NVIDIA driver in this container" in logs and "runs on the CPU" in logs, logs[-3000:]
