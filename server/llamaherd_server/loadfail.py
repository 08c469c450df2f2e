"""A model that cannot load fails loudly: one log line, a termination message, a non-zero exit.

The message always starts with :data:`LOAD_FAILED_PREFIX`. The operator tells a load failure
from other crashes by this prefix in the container's termination message (and reports it as
``Degraded``, reason ``ModelLoadFailed``); it keeps its own copy of the constant
(``llamaherd_operator.status.MODEL_LOAD_FAILED_PREFIX``) and a unit test holds the two equal.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from .cpus import CGROUP_ROOT, cgroup_memory_limit

LOAD_FAILED_PREFIX = "model load failed: "
# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_MAX_BYTES = 4096
GGUF_MAGIC = b"GGUF"
_GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count

log = logging.getLogger("llamaherd.server")


class ModelLoadError(Exception):
    """The model cannot be loaded; ``str()`` is the cause, for a person."""


def failure_message(model: Path, cause: str) -> str:
    """The one line that says a load failed: ``model load failed: <path>: <cause>``."""
    return f"{LOAD_FAILED_PREFIX}{model}: {cause}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_model_file(path: Path, *, gpu_layers: int = 0, cgroup_root: Path = CGROUP_ROOT) -> None:
    """Cheap checks before llama.cpp sees the file, so that the common mistakes get a precise
    message: missing, unreadable, not a GGUF, a cut-off header, larger than the memory limit.
    Raises :class:`ModelLoadError`."""
    if not path.exists():
        raise ModelLoadError("no such file")
    if not path.is_file():
        raise ModelLoadError("not a regular file")
    try:
        with path.open("rb") as f:
            header = f.read(_GGUF_HEADER.size)
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"cannot read the file: {exc.strerror or exc}") from None
    if len(header) < len(GGUF_MAGIC) or header[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"not a GGUF file (starts with {header[:4]!r}, a GGUF file starts with "
            f"{GGUF_MAGIC!r}; {size} bytes)"
        )
    if len(header) < _GGUF_HEADER.size:
        raise ModelLoadError(f"truncated GGUF file: only {size} bytes, the header is cut off")
    _, version, _, _ = _GGUF_HEADER.unpack(header)
    if version not in (2, 3):
        raise ModelLoadError(f"unsupported GGUF version {version} (llama.cpp reads 2 and 3)")
    if gpu_layers == 0:
        limit = cgroup_memory_limit(cgroup_root)
        if limit is not None and size > limit:
            raise ModelLoadError(
                f"the model is {_gib(size)}, more than the container's memory limit "
                f"({_gib(limit)}); give the container more memory or use a smaller model"
            )


def write_termination_message(path: Path | None, message: str) -> bool:
    """Write ``message`` to the container's termination message file (Kubernetes reads it
    when the container ends). Outside Kubernetes the file's folder may be missing or read-only:
    that is not an error, and a file in ``/dev`` that does not exist yet is not created.
    Returns whether it was written."""
    if path is None or not str(path):
        return False
    path = Path(path)
    if path.parent == Path("/dev") and not path.exists():
        # The kubelet creates the file; outside Kubernetes, leave /dev alone (even as root).
        return False
    data = message.encode("utf-8")[:TERMINATION_MESSAGE_MAX_BYTES]
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        log.debug("termination message not written to %s: %s", path, exc)
        return False
    return True
