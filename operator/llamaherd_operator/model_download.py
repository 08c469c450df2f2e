"""Model download, run by the server pod's init container (standard library only).

The init container runs ``python -m llamaherd_operator.model_download`` in the *server* image,
which installs the whole project but not the operator's dependencies (kopf, lightkube): this
module must import nothing outside the standard library nor anything else from this package, and
the package's ``__init__`` must stay import-free. What runs is the server image's copy, so an
operator upgrade never changes a pod template through it. Keep its env contract (``DOWNLOAD_*``)
stable: the operator that sets it and the server image that runs it may differ in version.

It downloads ``DOWNLOAD_URL`` to ``DOWNLOAD_PATH`` with retries and a per-attempt timeout, checks
``DOWNLOAD_SHA256`` when given, and writes the file atomically (``.part`` then rename), so a file
that is present is complete: with a matching hash (or no hash to check) it is kept and nothing is
downloaded. The last line on stderr says what went wrong; the pod's
``terminationMessagePolicy: FallbackToLogsOnError`` makes it the container's termination message,
which the operator shows in the InferenceService's Degraded condition.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

CHUNK_BYTES = 1 << 20
RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}


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


def fetch_once(url: str, dest: str, timeout: float) -> str:
    """Download ``url`` to a ``.part`` file, rename it to ``dest``; return its sha256."""
    part = f"{dest}.part-{socket.gethostname()}"  # pods sharing a cache claim do not collide
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "llamaherd-model-download/1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            next_report = time.monotonic() + 10
            with open(part, "wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if time.monotonic() >= next_report:
                        share = f" ({100 * done / total:.0f}%)" if total else ""
                        log(f"{done} bytes{share}")
                        next_report = time.monotonic() + 10
                out.flush()
                os.fsync(out.fileno())
            if total and done != total:
                raise DownloadError(f"short read: {done} of {total} bytes", retryable=True)
    except BaseException:
        if os.path.exists(part):
            os.remove(part)
        raise
    os.replace(part, dest)
    return digest.hexdigest()


def _fetch_or_raise(url: str, dest: str, timeout: float) -> str:
    try:
        return fetch_once(url, dest, timeout)
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"HTTP {err.code} {err.reason} from {url}", retryable=err.code in RETRYABLE_HTTP
        ) from err
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot download {url}: {reason}", retryable=True) from err


def download(
    url: str,
    dest: str,
    *,
    sha256: str | None,
    retries: int,
    timeout: float,
    backoff: float = 1.0,
) -> str:
    """Make sure ``dest`` holds the model; return what was done ("present" or "downloaded")."""
    expected = sha256.lower() if sha256 else None
    if os.path.isfile(dest):
        if expected is None:
            log(f"{dest} present (no sha256 to check); skipping download")
            return "present"
        if file_sha256(dest) == expected:
            log(f"{dest} present with the expected sha256; skipping download")
            return "present"
        log(f"{dest} present but its sha256 differs; downloading again")
        os.remove(dest)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    attempt = 0
    while True:
        attempt += 1
        log(f"downloading {url} to {dest} (attempt {attempt} of {retries + 1})")
        try:
            got = _fetch_or_raise(url, dest, timeout)
        except DownloadError as err:
            if not err.retryable or attempt > retries:
                raise
            delay = min(backoff * 2 ** (attempt - 1), 30.0)
            log(f"{err}; retrying in {delay:.0f}s")
            time.sleep(delay)
            continue
        if expected is not None and got != expected:
            os.remove(dest)
            raise DownloadError(
                f"sha256 mismatch for {url}: expected {expected}, got {got}", retryable=False
            )
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
