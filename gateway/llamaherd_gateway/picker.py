"""Picking a service (traffic split) and a replica (prefix affinity with bounded load).

**The rule.** Each replica's load is the number of requests this gateway has outstanding on it
(sent and not yet finished), plus the others' requests on it: what the replica last reported
(waiting and running, from its /metrics) less this gateway's own count at that moment. Other
gateway replicas and clients of the Service thus count too, as of the last poll. For a request
with a prompt:

1. The affinity key is the start of the prompt: the first ``prefix_chars`` characters of
   ``prompt`` (completions, generate; a prompt of token ids counts as its ids written out with
   spaces), or of the system prompt followed by the first user message (chat). Requests that
   share a prefix share a key.
2. The replicas are ordered by rendezvous (highest-random-weight) hashing of (key, replica): a
   consistent hash, so adding or removing a replica moves only the keys that land on it.
3. The first replica in that order (the affinity replica) gets the request when its load,
   counting this request, stays within ``(1 + c) x`` the mean load (counting this request):
   ``load + 1 <= ceil((1 + c) x (total + 1) / n)``, c = ``affinity_load_factor``. Reason
   ``affinity``.
4. Otherwise (affinity replica over the bound, or no key: empty prompt, affinity off) the
   least-loaded replica, ties broken at random. Reason ``least_loaded``.

c = 0 spreads as evenly as least-loaded while keeping the affinity whenever it costs nothing;
a large c keeps prefixes on their replica until it is far busier than the rest.

**Outliers.** Replicas ejected by outlier detection (:mod:`llamaherd_gateway.outliers`) are
left out before the pick, but never more than ``max_ejection_percent`` of a service's ready
endpoints (:func:`in_service`); a replica's consecutive failures count in its load, so one that
refuses connections never looks idle, ejected or not.

**Traffic split.** Several InferenceServices may serve one model name; a request picks one at
random with probability proportional to ``spec.gateway.weight`` among those with a ready
replica (weight 0 gets no traffic while another has a ready replica).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

AFFINITY = "affinity"
LEAST_LOADED = "least_loaded"
RANDOM = "random"
REASONS = (AFFINITY, LEAST_LOADED, RANDOM)


def affinity_key(path: str, body: Mapping[str, Any], prefix_chars: int) -> str:
    """The start of the prompt that decides the affinity replica; '' for none."""
    if prefix_chars <= 0:
        return ""
    if path.endswith("/chat/completions"):
        system, user = "", ""
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else []:
            if not isinstance(message, Mapping):
                continue
            role, content = message.get("role"), _text(message.get("content"))
            if role == "system" and not system:
                system = content
            elif role == "user":
                user = content
                break
        text = f"{system}\x00{user}" if system or user else ""
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            text = " ".join(map(str, prompt[:prefix_chars]))  # token ids, written out
        else:
            if isinstance(prompt, list):
                prompt = prompt[0] if prompt else ""
            text = _text(prompt)
    return text[:prefix_chars]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def _score(key: str, replica: str) -> int:
    # surrogatepass: a JSON string may hold a lone surrogate, which strict UTF-8 refuses
    text = f"{key}\x00{replica}".encode(errors="surrogatepass")
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """The replicas in the key's order of preference (highest random weight first)."""
    return sorted(replicas, key=lambda r: _score(key, r), reverse=True)


def load_bound(loads: Mapping[str, int], factor: float) -> int:
    """Most outstanding requests a replica may have after taking one more, under affinity."""
    total = sum(loads.values()) + 1
    return max(1, math.ceil((1.0 + factor) * total / max(1, len(loads))))


def pick_replica(
    key: str, loads: Mapping[str, int], factor: float, rng: random.Random | None = None
) -> tuple[str, str]:
    """(replica, reason) for a request with affinity ``key`` over ``loads`` (replica -> its
    outstanding requests; not empty)."""
    if not loads:
        raise ValueError("pick_replica needs at least one replica")
    if key:
        bound = load_bound(loads, factor)
        order = rendezvous_order(key, list(loads))
        if loads[order[0]] + 1 <= bound:
            return order[0], AFFINITY
    least = min(loads.values())
    candidates = [r for r, load in loads.items() if load == least]
    chosen = (rng or random).choice(sorted(candidates))
    return chosen, LEAST_LOADED


def ejectable(endpoints: int, ejected: int, max_percent: int) -> bool:
    """Whether one more of a service's ``endpoints`` may be ejected while ``ejected`` are:
    at most ``floor(endpoints x max_percent / 100)`` at once."""
    return ejected + 1 <= endpoints * max_percent // 100


def in_service(replicas: Sequence[T], ejected: Mapping[T, float], max_percent: int) -> list[T]:
    """The replicas to pick from: all but the ejected ones (``ejected``: replica -> when it was
    ejected), of which at most ``floor(len(replicas) x max_percent / 100)`` stay out, the
    earliest ejected first. Never none: when all may be out (100%), all are in."""
    out = [r for r in replicas if r in ejected]
    if not out:
        return list(replicas)
    allowed = len(replicas) * max_percent // 100
    kept_out = set(sorted(out, key=lambda r: ejected[r])[:allowed])
    return [r for r in replicas if r not in kept_out] or list(replicas)


def pick_weighted(
    items: Sequence[T], weights: Sequence[int], rng: random.Random | None = None
) -> T:
    """One item at random with probability proportional to its weight (all zero: uniform)."""
    if not items:
        raise ValueError("pick_weighted needs at least one item")
    if sum(weights) <= 0:
        return (rng or random).choice(list(items))
    return (rng or random).choices(list(items), weights=list(weights), k=1)[0]


def reported_load(metrics_text: str) -> int | None:
    """Waiting plus running requests in a llamaherd server's /metrics text; None when neither
    series is there (not a llamaherd server, or not yet)."""
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith(("llamaherd_requests_waiting", "llamaherd_requests_running")):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name not in ("llamaherd_requests_waiting", "llamaherd_requests_running"):
                continue
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            seen = True
    return round(total) if seen else None
