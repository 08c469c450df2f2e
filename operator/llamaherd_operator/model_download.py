"""Model download, run by the server pod's init container (standard library only).

The init container runs ``python -m llamaherd_operator.model_download`` in the *server* image,
which installs the whole project but not the operator's dependencies (kopf, lightkube): this
module must import nothing outside the standard library nor anything else from this package, and
the package's ``__init__`` must stay import-free. What runs is the server image's copy, so an
operator upgrade never changes a pod template through it. Keep its env contract (``DOWNLOAD_*``)
stable: the operator that sets it and the server image that runs it may differ in version.

It downloads ``DOWNLOAD_URL`` to ``DOWNLOAD_PATH`` with retries and a per-attempt timeout. Each
attempt writes a temporary file of its own in the same directory (named for the host, the
process and a random token: pods sharing a cache claim never write into one file), hashes it as
it writes, and only when the whole file arrived and its sha256 matched ``DOWNLOAD_SHA256`` (when
given) syncs it and renames it over ``DOWNLOAD_PATH``, atomically. So a file at
``DOWNLOAD_PATH`` is always a complete, verified one: with a matching hash (or no hash to check)
it is kept and nothing is downloaded, and a download whose hash differs exits 1 naming both
hashes and leaves ``DOWNLOAD_PATH`` as it was. Temporary files of downloads that were killed are
removed once they have not been written for ``STALE_PART_SECONDS``. The last line on stderr says
what went wrong; the pod's ``terminationMessagePolicy: FallbackToLogsOnError`` makes it the
container's termination message, which the operator shows in the InferenceService's Degraded
condition.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

CHUNK_BYTES = 1 << 20
RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
PART_SUFFIX = ".part"
STALE_PART_SECONDS = 600.0  # a temporary file unwritten this long belongs to a stopped download


class DownloadError(Exception):
    """A download that failed; ``retryable`` says whether another attempt may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def log(message: str) -> None:
    print(f"[model-download] {message}", file=sys.stderr, flush=True)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def part_path(dest: str) -> str:
    """A temporary name next to ``dest``, unique to this process: pods (and processes) that
    share a cache claim each write their own and never touch another's."""
    directory, base = os.path.split(dest)
    unique = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    return os.path.join(directory, f".{base}.{unique}{PART_SUFFIX}")


def remove_stale_parts(dest: str, older_than_s: float) -> None:
    """Remove the temporary files of downloads of ``dest`` that stopped (a pod killed while it
    downloaded) and have not been written for ``older_than_s``; a live download writes its
    file at least once per read timeout, so it is never one of them."""
    directory, base = os.path.split(dest)
    prefix = f".{base}."
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return
    cutoff = time.time() - older_than_s
    for name in names:
        if name.startswith(prefix) and name.endswith(PART_SUFFIX):
            path = os.path.join(directory, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.remove(path)
                    log(f"removed {path}, left by a download that stopped")
            except OSError:
                pass  # another pod removed it, or it is not ours to remove


def _sync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (some filesystems refuse: nothing to do then)."""
    try:
        handle = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def fetch_once(url: str, dest: str, timeout: float, expected: str | None) -> str:
    """Download ``url`` into a temporary file of this process next to ``dest``, hashing it as
    it is written; only a complete file whose sha256 is ``expected`` (when given) is synced and
    renamed to ``dest``, atomically. Returns its sha256. Whatever fails, the temporary file is
    removed and ``dest`` is left as it was."""
    part, created = part_path(dest), False
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "llamaherd-model-download/1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            next_report = time.monotonic() + 10
            # O_EXCL: a name some other process already has is never written into.
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
            with os.fdopen(fd, "wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if time.monotonic() >= next_report:
                        share = f" ({100 * done / total:.0f}%)" if total else ""
                        log(f"{done} bytes{share}")
                        next_report = time.monotonic() + 10
                if total and done != total:
                    raise DownloadError(f"short read: {done} of {total} bytes", retryable=True)
                got = digest.hexdigest()
                if expected is not None and got != expected:
                    raise DownloadError(
                        f"sha256 mismatch for {url}: expected {expected}, got {got} "
                        f"({done} bytes); nothing written to {dest}",
                        retryable=False,
                    )
                out.flush()
                os.fsync(out.fileno())
        os.replace(part, dest)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.remove(part)
        raise
    _sync_directory(os.path.dirname(dest))
    return got


def _fetch_or_raise(url: str, dest: str, timeout: float, expected: str | None) -> str:
    try:
        return fetch_once(url, dest, timeout, expected)
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"HTTP {err.code} {err.reason} from {url}", retryable=err.code in RETRYABLE_HTTP
        ) from err
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot download {url}: {reason}", retryable=True) from err
    except http.client.HTTPException as err:  # a malformed or cut-off response
        raise DownloadError(
            f"cannot download {url}: {type(err).__name__}: {err}", retryable=True
        ) from err


def download(
    url: str,
    dest: str,
    *,
    sha256: str | None,
    retries: int,
    timeout: float,
    backoff: float = 1.0,
) -> str:
    """Make sure ``dest`` holds the model; return what was done ("present" or "downloaded").

    ``dest`` only ever changes by an atomic rename of a complete, verified file: never removed,
    never written in place, so a pod that reads it (or another pod downloading the same model
    into the same cache) sees a whole good file or none."""
    expected = sha256.lower() if sha256 else None
    if os.path.isfile(dest):
        if expected is None:
            log(f"{dest} present (no sha256 to check); skipping download")
            return "present"
        present = file_sha256(dest)
        if present == expected:
            log(f"{dest} present with the expected sha256; skipping download")
            return "present"
        log(
            f"{dest} present but its sha256 is {present}, not {expected}; downloading again "
            "(it is replaced only by a verified download)"
        )
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    remove_stale_parts(dest, max(STALE_PART_SECONDS, 4 * timeout))
    attempt = 0
    while True:
        attempt += 1
        log(f"downloading {url} to {dest} (attempt {attempt} of {retries + 1})")
        try:
            got = _fetch_or_raise(url, dest, timeout, expected)
        except DownloadError as err:
            if not err.retryable or attempt > retries:
                raise
            delay = min(backoff * 2 ** (attempt - 1), 30.0)
            log(f"{err}; retrying in {delay:.0f}s")
            time.sleep(delay)
            continue
        log(f"downloaded {url} (sha256 {got})")
        return "downloaded"


def main(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    try:
        url = env["DOWNLOAD_URL"]
        dest = env["DOWNLOAD_PATH"]
        retries = int(env.get("DOWNLOAD_RETRIES", "5"))
        timeout = float(env.get("DOWNLOAD_TIMEOUT_SECONDS", "60"))
    except (KeyError, ValueError) as err:
        log(f"model download failed: bad configuration: {err}")
        return 2
    try:
        download(
            url, dest, sha256=env.get("DOWNLOAD_SHA256") or None, retries=retries, timeout=timeout
        )
    except DownloadError as err:
        log(f"model download failed: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
