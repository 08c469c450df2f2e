"""The init container's model download, against a real HTTP server on loopback."""

from __future__ import annotations

import ast
import hashlib
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from llamaherd_operator import builders, model_download

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Files(http.server.BaseHTTPRequestHandler):
    """/model.gguf serves PAYLOAD; /flaky fails twice with 503 first; anything else is 404."""

    hits: dict[str, int] = {}

    def do_GET(self) -> None:
        count = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/model.gguf" or (self.path == "/flaky" and count > 2):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/flaky":
            self.send_error(503)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def base_url() -> Iterator[str]:
    Files.hits = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run(url: str, dest: Path, sha: str | None = None, retries: int = 0) -> int:
    env = {
        "DOWNLOAD_URL": url,
        "DOWNLOAD_PATH": str(dest),
        "DOWNLOAD_RETRIES": str(retries),
        "DOWNLOAD_TIMEOUT_SECONDS": "10",
    }
    if sha:
        env["DOWNLOAD_SHA256"] = sha
    return model_download.main(env)


def test_download_verifies_and_then_skips(base_url: str, tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "m.gguf"
    assert run(f"{base_url}/model.gguf", dest, DIGEST.upper()) == 0
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["m.gguf"]  # no .part left behind
    assert run(f"{base_url}/model.gguf", dest, DIGEST) == 0
    assert Files.hits["/model.gguf"] == 1  # present with the right hash: not fetched again


def test_wrong_file_in_cache_is_replaced(base_url: str, tmp_path: Path) -> None:
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"stale")
    assert run(f"{base_url}/model.gguf", dest, DIGEST) == 0
    assert dest.read_bytes() == PAYLOAD


def test_sha_mismatch_fails_and_leaves_nothing(
    base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "m.gguf"
    assert run(f"{base_url}/model.gguf", dest, "0" * 64, retries=3) == 1
    assert list(tmp_path.iterdir()) == []  # no model, no temporary file
    assert Files.hits["/model.gguf"] == 1  # a mismatch is not retried
    last = capsys.readouterr().err.splitlines()[-1]
    assert "sha256 mismatch" in last
    assert f"expected {'0' * 64}, got {DIGEST}" in last


def test_a_mismatch_never_replaces_what_is_there(base_url: str, tmp_path: Path) -> None:
    """The final path changes only by the rename of a verified file: a download whose hash
    differs leaves an earlier file alone (it may be another pod's good one)."""
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"earlier")
    assert run(f"{base_url}/model.gguf", dest, "0" * 64) == 1
    assert dest.read_bytes() == b"earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_temporary_files_of_stopped_downloads_are_removed(base_url: str, tmp_path: Path) -> None:
    """A pod killed mid-download leaves its temporary file; the next download removes it once
    it has not been written for a while, and leaves a live one (recently written) alone."""
    dest = tmp_path / "m.gguf"
    stopped = tmp_path / ".m.gguf.gone-pod-1-0a1b2c3d.part"
    live = tmp_path / ".m.gguf.other-pod-1-4e5f6a7b.part"
    unrelated = tmp_path / ".other.gguf.gone-pod-1-0a1b2c3d.part"
    for path in (stopped, live, unrelated):
        path.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    os.utime(stopped, (hour_ago, hour_ago))
    os.utime(unrelated, (hour_ago, hour_ago))
    assert run(f"{base_url}/model.gguf", dest, DIGEST) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.gguf", live.name, unrelated.name]
    )


def test_retries_transient_errors(
    base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_download.time, "sleep", lambda _: None)
    dest = tmp_path / "m.gguf"
    assert run(f"{base_url}/flaky", dest, DIGEST, retries=2) == 0
    assert Files.hits["/flaky"] == 3


def test_not_found_fails_at_once_with_a_clear_last_line(
    base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(f"{base_url}/missing.gguf", tmp_path / "m.gguf", retries=5) == 1
    assert Files.hits["/missing.gguf"] == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model download failed: HTTP 404" in last


def test_unreachable_host_gives_up_after_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(model_download.time, "sleep", lambda _: None)
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run(f"http://127.0.0.1:{port}/m.gguf", tmp_path / "m.gguf", retries=2) == 1
    err = capsys.readouterr().err
    assert err.count("attempt") == 3
    assert "model download failed: cannot download" in err.strip().splitlines()[-1]


def init_container(url: str) -> dict[str, Any]:
    body = {
        "metadata": {"name": "m", "namespace": "n", "uid": "u"},
        "spec": {"model": {"url": url, "sha256": DIGEST}},
    }
    pod = builders.build_deployment(body)["spec"]["template"]["spec"]
    return cast(dict[str, Any], pod["initContainers"][0])


# The operator extra's dependencies and the rest of the project: the server image has none of
# the former, and the download must not need the latter.
NOT_IN_THE_DOWNLOAD = ("kopf", "lightkube", "yaml", "pydantic", "pydantic_settings", "httpx")


def test_the_module_runs_as_the_init_container_runs_it(base_url: str, tmp_path: Path) -> None:
    """The pod runs ``python -m llamaherd_operator.model_download`` in the server image, which
    has no kopf or lightkube: run it so, with those and the operator's other modules blocked."""
    init = init_container(f"{base_url}/model.gguf")
    assert init["command"][:2] == ["python", "-m"]
    env = {item["name"]: item["value"] for item in init["env"]}
    env["DOWNLOAD_PATH"] = str(tmp_path / "m.gguf")
    blocked = [*NOT_IN_THE_DOWNLOAD, *(f"llamaherd_operator.{m}" for m in OPERATOR_MODULES)]
    runner = (
        "import runpy, sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"runpy.run_module({init['command'][2]!r}, run_name='__main__', alter_sys=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", runner],
        env={**env, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.gguf").read_bytes() == PAYLOAD


OPERATOR_MODULES = sorted(
    p.stem
    for p in Path(model_download.__file__).parent.glob("*.py")
    if p.stem not in ("__init__", "__main__", "model_download")
)


@pytest.mark.parametrize("module", ["__init__.py", "model_download.py"])
def test_download_imports_only_the_standard_library(module: str) -> None:
    source = (Path(model_download.__file__).parent / module).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add((node.module or "").split(".")[0])
    assert imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def test_pod_template_does_not_carry_the_download_source(tmp_path: Path) -> None:
    """A new operator with a changed download module builds the same pod template (and hash):
    upgrading the operator rolls no pod. The changed module is a real copy of the package."""
    source = Path(model_download.__file__).read_text(encoding="utf-8")
    init = init_container("https://models.example/m.gguf")
    assert all(line not in json.dumps(init) for line in source.splitlines() if len(line) > 30)

    package = tmp_path / "llamaherd_operator"
    shutil.copytree(Path(model_download.__file__).parent, package)
    (package / "model_download.py").write_text(
        source + "\n\ndef a_new_feature() -> None:\n    pass\n", encoding="utf-8"
    )
    body = {
        "metadata": {"name": "m", "namespace": "n", "uid": "u"},
        "spec": {"model": {"url": "https://models.example/m.gguf"}},
    }
    program = (
        "import json, sys, llamaherd_operator.builders as b\n"
        "assert b.__file__.startswith(sys.argv[2]), b.__file__\n"
        "print(json.dumps(b.build_deployment(json.loads(sys.argv[1]))['spec']['template']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, json.dumps(body), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == builders.build_deployment(body)["spec"]["template"]


# ---- concurrent downloads into one cache directory ----------------------------------------------

CORRUPT = PAYLOAD[:1000] + bytes([PAYLOAD[1000] ^ 0xFF]) + PAYLOAD[1001:]


class Coordinated(http.server.BaseHTTPRequestHandler):
    """Serves /good (PAYLOAD), /corrupt (PAYLOAD with one byte flipped) and /truncated (the
    full Content-Length, then half the body and a closed connection). Every response waits
    until all expected requests have arrived (so every downloader has looked for the file
    already) and until its path is released; the body is sent in two halves with a second
    rendezvous between them, so the downloads' writes overlap."""

    server: Any

    def do_GET(self) -> None:
        shared = self.server.shared
        shared["arrived"].wait(timeout=30)
        shared["release"][self.path].wait(timeout=30)
        body = CORRUPT if self.path == "/corrupt" else PAYLOAD
        half = len(body) // 2
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:half])
        self.wfile.flush()
        if self.path == "/truncated":
            self.close_connection = True
            return
        if shared["interleave"] is not None:
            shared["interleave"].wait(timeout=30)
        self.wfile.write(body[half:])

    def log_message(self, *args: object) -> None:
        pass


class CoordinatedServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    shared: dict[str, Any]


@pytest.fixture
def coordinated() -> Iterator[tuple[str, dict[str, Any]]]:
    server = CoordinatedServer(("127.0.0.1", 0), Coordinated)
    server.shared = {
        "release": {
            path: threading.Event() for path in ("/good", "/corrupt", "/truncated", "/good2")
        },
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.shared
    for event in server.shared["release"].values():
        event.set()
    server.shutdown()
    server.server_close()


def downloader(url: str, dest: Path, sha: str) -> subprocess.Popen[str]:
    """The download as the init container runs it, in its own process."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DOWNLOAD_URL": url,
        "DOWNLOAD_PATH": str(dest),
        "DOWNLOAD_SHA256": sha,
        "DOWNLOAD_RETRIES": "0",
        "DOWNLOAD_TIMEOUT_SECONDS": "30",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "llamaherd_operator.model_download"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=dest.parent,
    )


class Watcher:
    """Reads the final path over and over while downloads run: anything it ever sees there
    must be the whole, good model."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.dest.read_bytes()
            except FileNotFoundError:
                pass
            else:
                self.seen.add(hashlib.sha256(data).hexdigest())
            self._stop.wait(0.002)

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.seen


def test_two_downloads_of_one_model_into_one_directory(
    coordinated: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Two pods on one cache claim download the same model at the same time, their writes
    interleaved: each writes its own temporary file, both succeed, and the model is whole."""
    base, shared = coordinated
    shared["arrived"] = threading.Barrier(2)
    shared["interleave"] = threading.Barrier(2)  # both are half-way before either finishes
    shared["release"]["/good"].set()
    shared["release"]["/good2"].set()
    dest = tmp_path / "m.gguf"
    watcher = Watcher(dest)
    procs = [downloader(f"{base}/good", dest, DIGEST), downloader(f"{base}/good2", dest, DIGEST)]
    errors = [proc.communicate(timeout=60)[1] for proc in procs]
    seen = watcher.stop()
    assert [proc.returncode for proc in procs] == [0, 0], errors
    assert dest.read_bytes() == PAYLOAD
    assert seen <= {DIGEST}
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left


@pytest.mark.parametrize("bad", ["/corrupt", "/truncated"])
@pytest.mark.parametrize("good_finishes_first", [True, False], ids=["good-first", "bad-first"])
def test_a_bad_download_beside_a_good_one_never_shows(
    coordinated: tuple[str, dict[str, Any]], tmp_path: Path, bad: str, good_finishes_first: bool
) -> None:
    """Two pods download one model into one cache; one of them gets a corrupted (or cut-off)
    body. Whichever finishes first, the final path only ever holds the good model, the good
    download succeeds, and the bad one fails naming what it got."""
    base, shared = coordinated
    shared["arrived"] = threading.Barrier(2)  # both have found no file before either writes
    shared["interleave"] = None
    dest = tmp_path / "m.gguf"
    watcher = Watcher(dest)
    procs = {
        "/good": downloader(f"{base}/good", dest, DIGEST),
        bad: downloader(f"{base}{bad}", dest, DIGEST),
    }
    errors = {}
    for path in ["/good", bad] if good_finishes_first else [bad, "/good"]:
        shared["release"][path].set()
        errors[path] = procs[path].communicate(timeout=60)[1]
    seen = watcher.stop()
    assert procs["/good"].returncode == 0, errors["/good"]
    assert procs[bad].returncode == 1, errors[bad]
    assert dest.read_bytes() == PAYLOAD
    assert seen <= {DIGEST}, "a bad file was at the final path"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    last = errors[bad].strip().splitlines()[-1]
    assert last.startswith("[model-download] model download failed: ")
    if bad == "/corrupt":
        assert f"expected {DIGEST}, got {hashlib.sha256(CORRUPT).hexdigest()}" in last
    else:
        assert f"short read: {len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes" in last
