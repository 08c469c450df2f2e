"""The NVIDIA driver for a CUDA build of llama.cpp, or the CPU when there is none.

A CUDA build of llama.cpp links ``libcuda.so.1``, which only exists where the NVIDIA driver is
installed (on a GPU node the NVIDIA container toolkit mounts it into the container). Without it
the library would not even load. The CUDA image therefore carries a fallback ``libcuda.so.1``
whose every function answers "no device" (made in Dockerfile.server from the symbols the build
uses); its path is in ``LLAMAHERD_CUDA_DRIVER_FALLBACK``. :func:`prepare` runs before
llama-cpp-python is imported: it loads the real driver when the loader can find it, the
fallback otherwise, so CUDA initialises with zero devices and llama.cpp serves on the CPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

FALLBACK_ENV = "LLAMAHERD_CUDA_DRIVER_FALLBACK"
DRIVER = "libcuda.so.1"

_note: str | None = None
_prepared = False


def prepare(environ: dict[str, str] | None = None) -> str | None:
    """Make ``libcuda.so.1`` resolvable before llama.cpp loads. Returns why the driver fell
    back (None when the real driver loaded, or when this is not the CUDA image)."""
    global _note, _prepared
    if _prepared:
        return _note
    env = os.environ if environ is None else environ
    fallback = env.get(FALLBACK_ENV, "")
    if fallback:
        try:
            ctypes.CDLL(DRIVER, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            # Loaded globally under the driver's soname, it satisfies libggml-cuda.so's
            # dependency and cudart's own dlopen of libcuda.so.1.
            ctypes.CDLL(fallback, mode=ctypes.RTLD_GLOBAL)
            _note = f"no NVIDIA driver in this container ({exc}): serving on the CPU"
            log.warning("%s", _note)
    _prepared = True
    return _note


# ggml_backend_dev_type
_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass
class Devices:
    """What llama.cpp can compute on, as /health reports it."""

    devices: list[dict[str, Any]] = field(default_factory=list)
    offload_supported: bool = False
    note: str | None = None

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return [d for d in self.devices if d["type"] in ("gpu", "igpu")]

    def as_json(self, gpu_layers: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "backend": "gpu" if self.gpus and gpu_layers != 0 else "cpu",
            "gpu_layers": gpu_layers,
            "offload_supported": self.offload_supported,
            "devices": self.gpus,
        }
        if self.note:
            body["note"] = self.note
        return body


def list_devices(lib: Any) -> Devices:
    """llama.cpp's backend devices through ggml's registry (``lib`` is llama_cpp; libllama's
    handle also resolves libggml's symbols, a dependency it loaded)."""
    handle = lib.llama_cpp._lib
    found = Devices(offload_supported=bool(lib.llama_supports_gpu_offload()), note=_note)
    try:
        count = handle.ggml_backend_dev_count
        get = handle.ggml_backend_dev_get
        name = handle.ggml_backend_dev_name
        desc = handle.ggml_backend_dev_description
        kind = handle.ggml_backend_dev_type
        memory = handle.ggml_backend_dev_memory
    except AttributeError:  # an older libggml
        return found
    count.restype = ctypes.c_size_t
    get.argtypes, get.restype = [ctypes.c_size_t], ctypes.c_void_p
    for fn in (name, desc):
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
    kind.argtypes, kind.restype = [ctypes.c_void_p], ctypes.c_int
    memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    memory.restype = None
    for i in range(count()):
        dev = get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.devices.append(
            {
                "name": (name(dev) or b"").decode(errors="replace"),
                "description": (desc(dev) or b"").decode(errors="replace"),
                "type": _DEV_TYPES.get(kind(dev), "other"),
                "memory_total_mib": total.value // 2**20,
                "memory_free_mib": free.value // 2**20,
            }
        )
    return found
