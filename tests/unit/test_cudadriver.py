"""The CUDA image's driver fallback (llamaherd_server.cudadriver), with a real shared library:
on a machine without the NVIDIA driver, prepare() makes the fallback answer for libcuda.so.1."""

from __future__ import annotations

import ctypes.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build a stand-in driver"),
    pytest.mark.skipif(
        ctypes.util.find_library("cuda") is not None,
        reason="this machine has the NVIDIA driver, so the fallback would not be used",
    ),
]

PROBE = """
import ctypes, json, sys
sys.path.insert(0, {server!r})
from llamaherd_server import cudadriver
note = cudadriver.prepare({env!r})
again = cudadriver.prepare({{}})
try:
    cuda = ctypes.CDLL("libcuda.so.1")
    loaded, rc = True, cuda.cuInit(0)
except OSError:
    loaded, rc = False, None
print(json.dumps({{"note": note, "again": again, "loaded": loaded, "rc": rc}}))
"""


def probe(env: dict[str, str]) -> dict[str, object]:
    import json

    code = PROBE.format(server=str(REPO / "server"), env=env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_a_driver_the_fallback_answers_for_libcuda(tmp_path: Path) -> None:
    src = tmp_path / "fallback.c"
    src.write_text("int cuInit(unsigned flags) { return 100; }\n")
    lib = tmp_path / "libcuda.so.1"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib), str(src)],
        check=True,
    )
    found = probe({"LLAMAHERD_CUDA_DRIVER_FALLBACK": str(lib)})
    # Loaded under the driver's soname, a later dlopen("libcuda.so.1") (cudart's) finds it.
    assert found["loaded"] is True and found["rc"] == 100, found
    assert "no NVIDIA driver" in str(found["note"]) and "CPU" in str(found["note"]), found
    assert found["again"] == found["note"], "prepare() runs once per process"


def test_outside_the_cuda_image_nothing_is_loaded() -> None:
    found = probe({})
    assert found == {"note": None, "again": None, "loaded": False, "rc": None}
