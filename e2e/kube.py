"""kubectl and helm against the cluster under test, and polling with a time bound.

Everything goes through the pinned kubectl and helm binaries with an explicit kubeconfig, so the
tests work the same on kind and on any other cluster a kubeconfig points at.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.harness import wait_until

T = TypeVar("T")
Obj = dict[str, Any]

API_GROUP = "llamaherd.io"
LHIS = f"inferenceservices.{API_GROUP}"


class KubeError(RuntimeError):
    """A kubectl or helm command that failed."""

    def __init__(self, args: list[str], result: subprocess.CompletedProcess[str]) -> None:
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.returncode = result.returncode
        output = (result.stderr or result.stdout)[-2000:]
        super().__init__(f"{' '.join(args)} exited {result.returncode}: {output}")


class WaitTimeout(AssertionError):
    """A condition that did not come true in time; the message holds the last state seen."""


def _short(value: object, limit: int = 3000) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    description: str,
    interval: float = 2.0,
    state: Callable[[], object] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    :func:`tests.harness.wait_until` with e2e's defaults: an exception from ``predicate`` counts
    as "not yet"; on timeout, :class:`WaitTimeout` names what was awaited, the last value or
    exception, and ``state()`` when given, each shortened for the report.
    """
    describe = None if state is None else (lambda: _short(state()))
    try:
        return wait_until(
            predicate,
            timeout=timeout,
            interval=interval,
            what=description,
            describe=describe,
            show=_short,
        )
    except TimeoutError as exc:
        raise WaitTimeout(str(exc)) from None


def hold_for(
    invariant: Callable[[], bool],
    *,
    seconds: float,
    description: str,
    interval: float = 2.0,
    state: Callable[[], object] | None = None,
) -> None:
    """Observe for ``seconds`` that ``invariant`` stays true (it must not raise)."""
    deadline = time.monotonic() + seconds
    while True:
        if not invariant():
            seen = f"; state: {_short(state())}" if state is not None else ""
            raise AssertionError(f"{description} stopped holding{seen}")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def condition(obj: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any]:
    """The condition of type ``kind`` in ``obj.status.conditions`` (empty when absent)."""
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            return item
    return {}


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return condition(pod, "Ready").get("status") == "True" and not pod["metadata"].get(
        "deletionTimestamp"
    )


class Kube:
    """kubectl and helm with one kubeconfig."""

    def __init__(self, kubeconfig: Path, kubectl: Path, helm: Path) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl_bin = kubectl
        self.helm_bin = helm

    # -- raw commands -------------------------------------------------------------------------

    def _run(
        self, args: list[str], *, stdin: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            args,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubeError(args, result)
        return result

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.kubectl_bin), f"--kubeconfig={self.kubeconfig}", *args]
        return self._run(cmd, stdin=stdin, check=check, timeout=timeout)

    def helm(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.helm_bin), f"--kubeconfig={self.kubeconfig}", *args]
        return self._run(cmd, stdin=None, check=check, timeout=timeout)

    # -- objects ------------------------------------------------------------------------------

    def apply(self, objects: Obj | Iterable[Obj] | str, namespace: str | None = None) -> str:
        """``kubectl apply`` of dicts or YAML text."""
        if isinstance(objects, str):
            text = objects
        else:
            docs = [objects] if isinstance(objects, Mapping) else list(objects)
            text = yaml.safe_dump_all(docs, sort_keys=False)
        ns = [f"--namespace={namespace}"] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", stdin=text).stdout

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        """One object as a dict, or None when it does not exist."""
        ns = [f"--namespace={namespace}"] if namespace else []
        result = self.kubectl("get", kind, name, *ns, "-o", "json", "--ignore-not-found")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def items(
        self,
        kind: str,
        namespace: str | None = None,
        selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Obj]:
        args = ["get", kind, "-o", "json"]
        args.append(f"--namespace={namespace}" if namespace else "--all-namespaces")
        if selector:
            args.append(f"--selector={selector}")
        if field_selector:
            args.append(f"--field-selector={field_selector}")
        return list(json.loads(self.kubectl(*args).stdout).get("items", []))

    def patch(
        self, kind: str, name: str, namespace: str, patch: Obj, kind_of: str = "merge"
    ) -> None:
        self.kubectl(
            "patch",
            kind,
            name,
            f"--namespace={namespace}",
            f"--type={kind_of}",
            "-p",
            json.dumps(patch),
        )

    def delete(
        self,
        kind: str,
        name: str,
        namespace: str | None = None,
        *,
        wait: bool = True,
        timeout: float = 180,
    ) -> None:
        ns = [f"--namespace={namespace}"] if namespace else []
        self.kubectl(
            "delete",
            kind,
            name,
            *ns,
            "--ignore-not-found",
            f"--wait={str(wait).lower()}",
            f"--timeout={int(timeout)}s",
            timeout=timeout + 30,
        )

    def events(self, namespace: str, name: str | None = None, kind: str | None = None) -> list[Obj]:
        """Events in ``namespace`` (about ``kind``/``name`` when given), oldest first."""
        selectors = []
        if name:
            selectors.append(f"involvedObject.name={name}")
        if kind:
            selectors.append(f"involvedObject.kind={kind}")
        items = self.items("events", namespace, field_selector=",".join(selectors) or None)
        return sorted(items, key=event_time)

    def pods(self, namespace: str, selector: str) -> list[Obj]:
        return self.items("pods", namespace, selector=selector)

    # -- pods ---------------------------------------------------------------------------------

    def exec(self, pod: str, namespace: str, *command: str, container: str | None = None) -> str:
        args = ["exec", pod, f"--namespace={namespace}"]
        if container:
            args.append(f"--container={container}")
        return self.kubectl(*args, "--", *command).stdout

    def logs(
        self,
        pod: str,
        namespace: str,
        container: str | None = None,
        *,
        previous: bool = False,
        tail: int | None = None,
    ) -> str:
        args = ["logs", pod, f"--namespace={namespace}"]
        if container:
            args.append(f"--container={container}")
        if previous:
            args.append("--previous")
        if tail is not None:
            args.append(f"--tail={tail}")
        return self.kubectl(*args).stdout


def event_time(event: Mapping[str, Any]) -> str:
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or event["metadata"].get("creationTimestamp", "")
    )
