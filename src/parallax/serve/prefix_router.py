"""Prefix-aware routing for Ray Serve replicas: requests that share a prompt prefix go to the
replica that has it in its prefix cache, unless queues are too uneven.

Ray Serve's proxy routes HTTP requests before it reads their bodies, so a router there cannot
see prompts. Hence two parts:

* the front deployment (serve/front.py) reads each request's body, takes the first
  ``prefix_chars`` characters of its prompt (``prefix_key``: completions' ``prompt``; chat:
  the messages' roles and contents) as the routing key, and forwards the raw HTTP request
  to an engine replica through a deployment handle (``ParallaxReplica.forward``).
* ``PrefixAffinityRouter``, a Ray Serve ``RequestRouter`` on the engine deployment (used by
  the front's handle): rendezvous hashing of the key over the live replicas picks the
  preferred replica (stable as replicas come and go: only the keys of a removed replica
  move); if its queue exceeds the shortest by more than ``imbalance`` requests, the least
  loaded replica takes the request instead. Requests without a key use power of two choices.

Only Ray Serve's public router API is used (``ray.serve.request_router``, Ray 2.60): queue
lengths come from ``replica_queue_len_cache``, which Serve fills as it probes the replicas
of the ranks a router returns and from the replicas' own reports; a replica with no entry
yet counts as unknown (it neither triggers nor blocks the fallback).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from typing import Any

from ray.serve.request_router import RequestRouter

logger = logging.getLogger(__name__)

DEFAULT_IMBALANCE = 8     # queued requests by which the preferred replica may exceed the least


def prefix_key(body: bytes, prefix_chars: int) -> str:
    """The routing key of an OpenAI request body: its prompt's first ``prefix_chars``
    characters ("" when there is no prompt, e.g. a GET)."""
    try:
        req = json.loads(body) if body else {}
    except ValueError:
        return ""
    if not isinstance(req, dict):
        return ""
    prompt: Any = req.get("prompt")
    if prompt is None and isinstance(req.get("messages"), list):
        prompt = "".join(f"{m.get('role')}:{m.get('content')}\n" for m in req["messages"]
                         if isinstance(m, dict))
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]                 # a batch: route by its first prompt
    if isinstance(prompt, list):           # token ids
        prompt = ",".join(str(t) for t in prompt)
    return str(prompt or "")[:prefix_chars]


def _weight(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(),
                          "big")


def preferred_order(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids by rendezvous-hash preference for ``key`` (first = preferred)."""
    return sorted(replica_ids, key=lambda r: _weight(key, r), reverse=True)


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: key (``args[0]``) -> preferred replica, unless its queue
    exceeds the shortest queue by more than ``imbalance`` (request_router_kwargs). Returns
    ranked groups; Serve sends the request to the first group's replica that accepts it."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **kwargs) -> None:
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = None
        if pending_request is not None and pending_request.args:
            key = pending_request.args[0]
        if not isinstance(key, str) or not key or not candidate_replicas:
            # No prompt (GET /health, /metrics): power of two choices; Serve takes the
            # shorter queue of the two.
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        order = preferred_order(key, list(by_id))
        queues = self._queue_lens(candidate_replicas)
        best = by_id[order[0]]
        known = [q for q in queues.values() if q is not None]
        mine = queues.get(order[0])
        if mine is not None and known and mine - min(known) > self.imbalance:
            least = min((r for r in candidate_replicas if queues.get(
                r.replica_id.to_full_id_str()) is not None),
                key=lambda r: queues[r.replica_id.to_full_id_str()])
            return [[least]]
        return [[best], [by_id[r] for r in order[1:]]]

    def _queue_lens(self, replicas) -> dict[str, int | None]:
        """Each replica's last known queue length (None: not known yet)."""
        return {r.replica_id.to_full_id_str(): self.replica_queue_len_cache.get(r.replica_id)
                for r in replicas}
