"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager, scheduler.

No kubelet runs, so pods are scheduled nowhere and stay Pending; everything else (CRDs, RBAC,
Deployments → ReplicaSets → Pods, garbage collection, server-side apply) is the real thing.

Also the command behind ``make cluster-up`` / ``make cluster-down``::

    python -m tests.harness.controlplane up     # last line printed: the kubeconfig path
    python -m tests.harness.controlplane down
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness import (
    REPO_ROOT,
    binary_path,
    cache_dir,
    free_port,
    wait_port_free,
)
from tests.harness.process import ManagedProcess

# DESIGN.md network rules: cluster ranges come from 198.18.0.0/15, never from RFC 1918.
SERVICE_CIDR = "198.19.0.0/16"
CLUSTER_CIDR = "198.18.0.0/16"
KUBERNETES_SERVICE_IP = "198.19.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 120.0


def _logs_root() -> Path:
    return Path(os.environ.get("LLAMAHERD_ARTIFACTS", REPO_ROOT / ".artifacts")) / "cluster-logs"


# --- certificates -------------------------------------------------------------------------------


@dataclass
class _KeyPair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        crt, key = directory / f"{name}.crt", directory / f"{name}.key"
        crt.write_bytes(self.cert_pem())
        key.write_bytes(self.key_pem())
        key.chmod(0o600)
        return crt, key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _make_ca() -> _KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("llamaherd-test-ca"))
        .issuer_name(_name("llamaherd-test-ca"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _KeyPair(cert, key)


def _issue(
    ca: _KeyPair,
    common_name: str,
    *,
    organization: str | None = None,
    server: bool = False,
    client: bool = False,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> _KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organization))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _KeyPair(builder.sign(ca.key, hashes.SHA256()), key)


def _kubeconfig(server: str, ca: _KeyPair, user: _KeyPair, name: str) -> str:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "llamaherd",
                "cluster": {"server": server, "certificate-authority-data": b64(ca.cert_pem())},
            }
        ],
        "users": [
            {
                "name": name,
                "user": {
                    "client-certificate-data": b64(user.cert_pem()),
                    "client-key-data": b64(user.key_pem()),
                },
            }
        ],
        "contexts": [{"name": "llamaherd", "context": {"cluster": "llamaherd", "user": name}}],
        "current-context": "llamaherd",
    }
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML: every client reads it


# --- processes ----------------------------------------------------------------------------------


@dataclass
class _Process:
    """One control-plane binary started in a session (so a process group) of its own, its
    log appended to ``log``."""

    name: str
    argv: list[str]
    log: Path
    ports: list[int]
    process: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        self.process = ManagedProcess(
            self.argv, self.log, name=self.name, cwd=None, append=True, new_session=True
        )

    @property
    def pid(self) -> int:
        return self.process.pid if self.process.proc is not None else 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n=== {dt.datetime.now().isoformat()} {' '.join(self.argv)}".encode())
        self.process.start()

    def exited(self) -> int | None:
        """The exit code if the process has ended (-1 if it never started), else None."""
        return self.process.returncode if self.process.proc is not None else -1

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.alive():
            _kill_group(self.pid, self.argv[0], timeout)
        self.process.stop(timeout)  # reaps it (and signals it, should the group kill miss it)
        for port in self.ports:
            wait_port_free(port, timeout)
        self.process.proc = None

    def tail(self, lines: int = 30) -> str:
        return self.process.tail(lines)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _owns(pid: int, executable: str) -> bool:
    """Guard against a recycled pid: the process must still run ``executable``."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return argv0 == executable


def _kill_group(pid: int, executable: str, timeout: float) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL it if it lingers."""
    if not _owns(pid, executable):
        return
    for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


# --- the control plane --------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on 127.0.0.1.

    ``workdir`` (certificates, etcd data, kubeconfigs) is a temporary folder unless given;
    ``logs_dir`` defaults to ``.artifacts/cluster-logs/<timestamp>/`` and is kept after ``stop``.
    """

    workdir: Path | None = None
    logs_dir: Path | None = None
    keep_workdir: bool = False
    apiserver_port: int = 0
    etcd_port: int = 0
    etcd_peer_port: int = 0
    _procs: dict[str, _Process] = field(default_factory=dict)
    _ssl: ssl.SSLContext | None = None
    _owns_workdir: bool = False

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user ``admin`` in group ``system:masters``)."""
        assert self.workdir is not None, "control plane not started"
        return self.workdir / "admin.kubeconfig"

    # lifecycle

    def start(self) -> ControlPlane:
        """Start every component and wait until pods can be created in ``default``."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="llamaherd-cp-"))
            self._owns_workdir = True
        if self.logs_dir is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            self.logs_dir = _logs_root() / stamp
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.apiserver_port = self.apiserver_port or free_port()
        self.etcd_port = self.etcd_port or free_port()
        self.etcd_peer_port = self.etcd_peer_port or free_port()
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._start("kube-controller-manager", self._controller_manager_args(), [])
            self._start("kube-scheduler", self._scheduler_args(), [])
            self._wait(self._default_service_account, "the default ServiceAccount")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process group, check that its ports are free, drop the workdir."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self._procs:
                self._procs.pop(name).stop()
        if self._owns_workdir and self.workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port; wait until it is ready."""
        self._procs.pop("kube-apiserver").stop()
        self._start_apiserver()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # helpers for tests

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster (text in, text out)."""
        return kubectl(self.kubeconfig, *args, input=input, check=check, timeout=timeout)

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items()}

    def describe(self) -> str:
        """One line for failure messages: where the logs are."""
        return f"control plane {self.server}, logs in {self.logs_dir}"

    # internals

    def _write_pki(self) -> None:
        assert self.workdir is not None
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        self._ca = _make_ca()
        self._ca_crt, self._ca_key = self._ca.write(pki, "ca")
        serving = _issue(
            self._ca,
            "kube-apiserver",
            server=True,
            dns=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ips=("127.0.0.1", KUBERNETES_SERVICE_IP),
        )
        self._serving_crt, self._serving_key = serving.write(pki, "apiserver")
        kubelet_client = _issue(
            self._ca, "kube-apiserver-kubelet-client", organization="system:masters", client=True
        )
        self._kubelet_client_crt, self._kubelet_client_key = kubelet_client.write(
            pki, "apiserver-kubelet-client"
        )
        sa_key = ec.generate_private_key(ec.SECP256R1())
        self._sa_key = pki / "sa.key"
        self._sa_pub = pki / "sa.pub"
        self._sa_key.write_bytes(_key_pem(sa_key))
        self._sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        users = {
            "admin": _issue(self._ca, "admin", organization="system:masters", client=True),
            "controller-manager": _issue(self._ca, "system:kube-controller-manager", client=True),
            "scheduler": _issue(self._ca, "system:kube-scheduler", client=True),
        }
        for name, pair in users.items():
            (self.workdir / f"{name}.kubeconfig").write_text(
                _kubeconfig(self.server, self._ca, pair, name)
            )
        admin = users["admin"]
        admin_crt, admin_key = admin.write(pki, "admin")
        self._ssl = ssl.create_default_context(cafile=str(self._ca_crt))
        self._ssl.load_cert_chain(str(admin_crt), str(admin_key))

    def _start(self, name: str, argv: list[str], ports: list[int]) -> _Process:
        assert self.logs_dir is not None
        proc = _Process(name, argv, self.logs_dir / f"{name}.log", ports)
        proc.start()
        self._procs[name] = proc
        return proc

    def _wait(self, probe: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
        """Wait for ``probe()`` while checking that no component has died."""

        def check() -> bool:
            for proc in self._procs.values():
                code = proc.exited()
                if code is not None:
                    raise RuntimeError(
                        f"{proc.name} exited with {code} while waiting for {what}; "
                        f"log {proc.log}:\n{proc.tail()}"
                    )
            return probe()

        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; {self}")
            time.sleep(0.2)

    def _start_etcd(self) -> None:
        assert self.workdir is not None
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        argv = [
            str(binary_path("etcd")),
            "--name=llamaherd",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=llamaherd={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",  # a throwaway test store: speed over durability
            "--log-level=warn",
        ]
        self._start("etcd", argv, [self.etcd_port, self.etcd_peer_port])
        self._wait(lambda: self._http_ok(f"{client}/health"), "etcd /health")

    def _apiserver_args(self) -> list[str]:
        return [
            str(binary_path("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # Endpoints may not hold loopback addresses: the default lease reconciler fails to
            # publish 127.0.0.1 for the `kubernetes` Service and then stalls shutdown for good.
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={self._serving_crt}",
            f"--tls-private-key-file={self._serving_key}",
            f"--client-ca-file={self._ca_crt}",
            f"--kubelet-client-certificate={self._kubelet_client_crt}",
            f"--kubelet-client-key={self._kubelet_client_key}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={self._sa_pub}",
            f"--service-account-signing-key-file={self._sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # Without it, open watches (controller-manager, scheduler) hold a SIGTERM for 15s+.
            "--shutdown-watch-termination-grace-period=1s",
            "--allow-privileged=true",
            "--profiling=false",
            f"--cert-dir={self.workdir}/apiserver-certs",
        ]

    def _start_apiserver(self) -> None:
        self._start("kube-apiserver", self._apiserver_args(), [self.apiserver_port])
        self._wait(lambda: self._api_ok("/readyz"), "kube-apiserver /readyz")

    def _controller_manager_args(self) -> list[str]:
        assert self.workdir is not None
        return [
            str(binary_path("kube-controller-manager")),
            f"--kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--leader-elect=false",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--root-ca-file={self._ca_crt}",
            f"--service-account-private-key-file={self._sa_key}",
            f"--cluster-signing-cert-file={self._ca_crt}",
            f"--cluster-signing-key-file={self._ca_key}",
            f"--cluster-cidr={CLUSTER_CIDR}",
            "--allocate-node-cidrs=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ]

    def _scheduler_args(self) -> list[str]:
        assert self.workdir is not None
        return [
            str(binary_path("kube-scheduler")),
            f"--kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--leader-elect=false",
        ]

    def _http_ok(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=self._ssl) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _api_ok(self, path: str) -> bool:
        return self._http_ok(f"{self.server}{path}")

    def _default_service_account(self) -> bool:
        return self._api_ok("/api/v1/namespaces/default/serviceaccounts/default")

    # state for the CLI

    def state(self) -> dict[str, object]:
        return {
            "workdir": str(self.workdir),
            "logs_dir": str(self.logs_dir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "processes": [
                {"name": p.name, "pid": p.pid, "executable": p.argv[0], "ports": p.ports}
                for p in self._procs.values()
            ],
        }


class ExistingCluster:
    """A cluster that someone else runs, reached through ``$KUBECONFIG``."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.logs_dir: Path | None = None

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return kubectl(self.kubeconfig, *args, input=input, check=check, timeout=timeout)

    def restart_apiserver(self) -> None:
        import pytest

        pytest.skip("restart_apiserver needs the harness's own control plane, not $KUBECONFIG")

    def describe(self) -> str:
        return f"existing cluster from {self.kubeconfig}"

    def stop(self) -> None:
        """Nothing to stop: the cluster is not ours."""


def kubectl(
    kubeconfig: Path,
    *args: str,
    input: str | None = None,
    check: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the pinned kubectl with ``--kubeconfig``; returns the CompletedProcess."""
    argv = [str(binary_path("kubectl")), f"--kubeconfig={kubeconfig}", *args]
    return subprocess.run(
        argv, input=input, capture_output=True, text=True, check=check, timeout=timeout
    )


# --- make cluster-up / cluster-down -------------------------------------------------------------


def _state_file() -> Path:
    return cache_dir() / "cluster" / "state.json"


def _cli_up() -> int:
    state_file = _state_file()
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if any(_alive(p["pid"]) for p in state["processes"]):
            print(f"[cluster] already up (state in {state_file}); `make cluster-down` first")
            print(state["kubeconfig"])
            return 0
        state_file.unlink()
    workdir = state_file.parent / "run"
    shutil.rmtree(workdir, ignore_errors=True)
    plane = ControlPlane(workdir=workdir)
    started = time.monotonic()
    plane.start()
    state_file.write_text(json.dumps(plane.state(), indent=2) + "\n")
    print(f"[cluster] up in {time.monotonic() - started:.1f}s: {plane.server}")
    print(f"[cluster] logs in {plane.logs_dir}; stop with `make cluster-down`")
    print(plane.kubeconfig)
    return 0


def _cli_down() -> int:
    state_file = _state_file()
    if not state_file.exists():
        print("[cluster] not running (no state file)")
        return 0
    state = json.loads(state_file.read_text())
    for proc in reversed(state["processes"]):
        _kill_group(proc["pid"], proc["executable"], timeout=15)
        for port in proc["ports"]:
            wait_port_free(port, 15)
        print(f"[cluster] stopped {proc['name']} (pid {proc['pid']})")
    shutil.rmtree(state["workdir"], ignore_errors=True)
    state_file.unlink()
    print("[cluster] down")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.controlplane")
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    return _cli_up() if args.command == "up" else _cli_down()


if __name__ == "__main__":
    sys.exit(main())
