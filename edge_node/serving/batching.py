"""Dynamic batching of v2 infer requests, per app, in the event-loop front.

Requests for one app that arrive while its worker is busy are joined along
their first dimension into one worker call, and the answer is split back. What
the policy says (from the manifest's ``batching`` section, a node override,
and the slice's card, see :func:`policy_for`):

- ``max_batch``: at most this many rows (batch items) in one worker call.
- ``max_delay_ms``: the longest a request waits for others to join it.
- ``max_in_flight``: worker calls of this app at once; a request that arrives
  while fewer are in flight goes out at once (a lone caller never waits), the
  rest queue until a call returns, the batch is full, or the delay is over.

Only requests that can share a call are joined: the same input names, dtypes
and shapes past the first dimension, and the same requested outputs. Every
input's first dimension is the request's row count and must agree across its
inputs; a request that does not fit this (a scalar input, mixed first
dimensions) is sent alone. If a joined call fails with a 4xx (one bad item) each
request is sent again alone, so one bad request never fails its neighbours. If
an output's first dimension does not match the rows sent (the model does not
batch that way), batching is switched off for the app, logged once, and the
requests are sent alone.

Off by default on CPU (batching trades latency for throughput, and CPU slices
already run one inference per core); on by default on a GPU slice when the
manifest allows batches (``max_batch`` > 1). Runs only on the event loop's
thread: no locks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_node.worker.errors import WorkerError

logger = logging.getLogger(__name__)

Done = Callable[[dict | None, Exception | None], None]


class BatchOverride(BaseModel):
    """A node's override of an app's batching (``http.batching`` in the node config)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None  #: None: the manifest and the card decide
    max_batch: int | None = Field(default=None, ge=1, le=1024)
    max_delay_ms: float | None = Field(default=None, ge=0, le=1000)
    max_in_flight: int | None = Field(default=None, ge=1, le=64)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int
    max_delay_s: float
    max_in_flight: int = 1

    def to_dict(self) -> dict:
        return {"max_batch": self.max_batch, "max_delay_ms": self.max_delay_s * 1000,
                "max_in_flight": self.max_in_flight}


def policy_for(batching: Any, card_kind: str, override: BatchOverride | None = None
               ) -> BatchPolicy | None:
    """The policy for an app (None: no batching). ``batching`` is the manifest's
    :class:`~cloud_sync.manifest.Batching`; ``card_kind`` its slice's card kind."""
    o = override or BatchOverride()
    max_batch = o.max_batch if o.max_batch is not None else batching.max_batch
    on = o.enabled if o.enabled is not None else (card_kind == "gpu" or batching.cpu)
    if not on or max_batch <= 1:
        return None
    delay = o.max_delay_ms if o.max_delay_ms is not None else batching.max_delay_ms
    in_flight = o.max_in_flight if o.max_in_flight is not None else batching.max_in_flight
    return BatchPolicy(max_batch, delay / 1000.0, in_flight)


def _shape_key(inputs: dict[str, np.ndarray], ask) -> tuple[tuple, int] | None:
    """(what must match to share a call, rows) or None when the request cannot join."""
    rows = None
    sig = []
    for name, arr in inputs.items():
        if arr.ndim == 0 or arr.dtype.kind in "OUS":
            return None
        if rows is None:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            return None
        sig.append((name, arr.dtype.str, arr.shape[1:]))
    if not rows:
        return None
    return (tuple(ask) if ask is not None else None, tuple(sig)), rows


class Batcher:
    """Joins one app's infer requests; ``submit`` has :meth:`AsyncWorker.submit`'s shape."""

    def __init__(self, worker, policy: BatchPolicy, loop, app_name: str = "") -> None:
        self.worker = worker
        self.policy = policy
        self.loop = loop
        self.app = app_name
        self.enabled = True
        self.in_flight = 0
        self._pending: list[tuple[dict, Done, int]] = []
        self._rows = 0
        self._key: tuple | None = None
        self._timer = None
        #: calls (to the worker, all of them), requests, rows (in joinable requests),
        #: joined (requests that shared a call), split_retries, alone (sent without
        #: trying to join), largest (rows of the largest call)
        self.stats: Counter[str] = Counter()

    # -- in ------------------------------------------------------------------
    def submit(self, msg: dict, done: Done) -> None:
        """``msg`` is an infer request ``{"op": "infer", "inputs", "outputs"}``."""
        self.stats["requests"] += 1
        keyed = _shape_key(msg["inputs"], msg.get("outputs")) if self.enabled else None
        if keyed is None:
            self.stats["alone"] += 1
            return self._send(msg, done)
        key, rows = keyed
        if rows >= self.policy.max_batch:
            self.stats["alone"] += 1
            return self._send(msg, done)
        if self._pending and (key != self._key or self._rows + rows > self.policy.max_batch):
            self._flush()
        self._pending.append((msg, done, rows))
        self._rows += rows
        self._key = key
        if self._rows >= self.policy.max_batch or self.in_flight < self.policy.max_in_flight:
            self._flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(self.policy.max_delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._pending:
            self._flush()

    # -- out -----------------------------------------------------------------
    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._pending, self._rows, self._key = self._pending, [], 0, None
        if not items:
            return
        total = sum(n for _, _, n in items)
        self.stats["rows"] += total
        self.stats["largest"] = max(self.stats["largest"], total)
        if len(items) == 1:
            msg, done, _ = items[0]
            return self._send(msg, done)
        self.stats["joined"] += len(items)
        first = items[0][0]
        inputs = {name: np.concatenate([m["inputs"][name] for m, _, _ in items])
                  for name in first["inputs"]}
        joined = {"op": "infer", "inputs": inputs, "outputs": first.get("outputs")}
        self._send(joined, lambda reply, err: self._split(items, total, reply, err))

    def _send(self, msg: dict, done: Done) -> None:
        self.stats["calls"] += 1
        self.in_flight += 1

        def back(reply, err) -> None:
            self.in_flight -= 1
            try:
                done(reply, err)
            finally:
                if self._pending and self.in_flight < self.policy.max_in_flight:
                    self._flush()

        self.worker.submit(msg, back)

    def _split(self, items, total: int, reply: dict | None, err: Exception | None) -> None:
        if err is not None:
            if isinstance(err, WorkerError) and 400 <= err.status < 500:
                self.stats["split_retries"] += 1  # one bad request: the others must not fail
                for msg, done, _ in items:
                    self._send(msg, done)
                return
            for _, done, _ in items:
                done(None, err)
            return
        outputs = reply["outputs"]
        if any(getattr(v, "ndim", 0) == 0 or v.shape[0] != total for v in outputs.values()):
            logger.warning("app %s: an output's first dimension is not the batch (%s for %d "
                           "rows); batching is off for this app", self.app,
                           {k: getattr(v, "shape", None) for k, v in outputs.items()}, total)
            self.enabled = False
            self.stats["disabled"] = 1
            for msg, done, _ in items:
                self._send(msg, done)
            return
        start = 0
        for _, done, rows in items:
            part = {k: v[start:start + rows] for k, v in outputs.items()}
            start += rows
            done({"ok": True, "outputs": part}, None)

    def snapshot(self) -> dict:
        return {**self.policy.to_dict(), "enabled": self.enabled,
                "in_flight": self.in_flight, "queued": len(self._pending), **self.stats}
