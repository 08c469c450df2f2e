"""The init container's model download, against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

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
    assert not dest.exists()
    assert Files.hits["/model.gguf"] == 1  # a mismatch is not retried
    assert "sha256 mismatch" in capsys.readouterr().err.splitlines()[-1]


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


def test_the_embedded_script_runs_as_the_init_container_runs_it(
    base_url: str, tmp_path: Path
) -> None:
    """The pod runs ``python -c <source>``: the source must stand alone (stdlib only)."""
    body = {
        "metadata": {"name": "m", "namespace": "n", "uid": "u"},
        "spec": {"model": {"url": f"{base_url}/model.gguf", "sha256": DIGEST}},
    }
    init = builders.build_deployment(body)["spec"]["template"]["spec"]["initContainers"][0]
    env = {item["name"]: item["value"] for item in init["env"]}
    env["DOWNLOAD_PATH"] = str(tmp_path / "m.gguf")
    result = subprocess.run(
        [sys.executable, "-I", *init["command"][1:]],
        env={**env, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.gguf").read_bytes() == PAYLOAD
