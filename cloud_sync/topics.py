"""Every MQTT topic of the protocol, built and parsed in one place.

All topics live under one versioned root, ``aidc/v1`` by default. A deployment
(or a test) may put a prefix in front of the root so several fleets can share
one broker: ``Topics(prefix="site-a")`` gives ``site-a/aidc/v1/...``.

Node-scoped topics are ``<root>/nodes/<node_id>/<kind>`` where ``kind`` is one of
:data:`NODE_KINDS`. Nobody builds a topic string by hand anywhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MessageRejected

ROOT = "aidc/v1"

#: node id: what may appear in a topic level (no wildcards, no slashes).
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: kind -> (direction, retained, qos). Direction: "up" edge->cloud, "down" cloud->edge.
NODE_KINDS: dict[str, tuple[str, bool, int]] = {
    "availability": ("up", True, 1),  # online/offline, retained, last will
    "state/reported": ("up", True, 1),  # device twin: what the node runs
    "state/desired": ("down", True, 1),  # device twin: what the cloud wants
    "telemetry": ("up", False, 0),  # periodic resource/health figures
    "events": ("up", False, 1),  # durable facts from the node's outbox
    "feedback": ("up", False, 1),  # hard-example samples from the node's outbox
    "ack": ("down", False, 1),  # cloud acknowledges outbox messages by msg_id
    "blob/request": ("up", False, 1),  # node asks for a byte range of a blob
    "blob/chunk": ("down", False, 1),  # cloud answers with one chunk
    "commands": ("down", False, 1),  # remote operations: the cloud asks (re-sent until answered)
    "results": ("up", False, 1),  # the node answers a command, from its outbox, acked
    "ping": ("up", False, 1),  # liveness: nobody subscribes, the broker's PUBACK answers
}


def validate_node_id(node_id: str) -> str:
    if not NODE_ID_RE.match(node_id or ""):
        raise ValueError(
            f"invalid node id {node_id!r}: 1-64 of letters, digits, '_', '-', '.'"
        )
    return node_id


@dataclass(frozen=True)
class Topics:
    """Topic builder/parser bound to one prefix."""

    prefix: str = ""

    @property
    def root(self) -> str:
        p = self.prefix.strip("/")
        return f"{p}/{ROOT}" if p else ROOT

    # -- builders ---------------------------------------------------------
    def node(self, node_id: str, kind: str) -> str:
        if kind not in NODE_KINDS:
            raise ValueError(f"unknown topic kind {kind!r}")
        return f"{self.root}/nodes/{validate_node_id(node_id)}/{kind}"

    def availability(self, node_id: str) -> str:
        return self.node(node_id, "availability")

    def reported(self, node_id: str) -> str:
        return self.node(node_id, "state/reported")

    def desired(self, node_id: str) -> str:
        return self.node(node_id, "state/desired")

    def telemetry(self, node_id: str) -> str:
        return self.node(node_id, "telemetry")

    def events(self, node_id: str) -> str:
        return self.node(node_id, "events")

    def feedback(self, node_id: str) -> str:
        return self.node(node_id, "feedback")

    def ack(self, node_id: str) -> str:
        return self.node(node_id, "ack")

    def blob_request(self, node_id: str) -> str:
        return self.node(node_id, "blob/request")

    def blob_chunk(self, node_id: str) -> str:
        return self.node(node_id, "blob/chunk")

    def commands(self, node_id: str) -> str:
        return self.node(node_id, "commands")

    def results(self, node_id: str) -> str:
        return self.node(node_id, "results")

    def ping(self, node_id: str) -> str:
        return self.node(node_id, "ping")

    def service_ping(self, client_id: str) -> str:
        """The liveness ping of a cloud client (an AppStore worker): like a node's,
        answered by the broker's PUBACK, read by nobody."""
        if not NODE_ID_RE.match(client_id or ""):
            raise ValueError(f"invalid client id {client_id!r}")
        return f"{self.root}/service/{client_id}/ping"

    def stream_status(self, node_id: str, stream_id: str) -> str:
        """Retained status of one camera stream of a node."""
        if not NODE_ID_RE.match(stream_id or ""):
            raise ValueError(f"invalid stream id {stream_id!r}")
        return f"{self.root}/nodes/{validate_node_id(node_id)}/streams/{stream_id}/status"

    def all_stream_status(self) -> str:
        return f"{self.root}/nodes/+/streams/+/status"

    def parse_stream_status(self, topic: str) -> tuple[str, str]:
        """``(node_id, stream_id)`` of a stream status topic, or MessageRejected."""
        head = f"{self.root}/nodes/"
        p = topic[len(head):].split("/") if topic.startswith(head) else []
        if (len(p) != 4 or p[1] != "streams" or p[3] != "status"
                or not NODE_ID_RE.match(p[0]) or not NODE_ID_RE.match(p[2])):
            raise MessageRejected("bad_topic", f"not a stream status topic: {topic!r}")
        return p[0], p[2]

    # -- subscription filters --------------------------------------------
    def all_nodes(self, kind: str) -> str:
        """Filter matching ``kind`` for every node: ``<root>/nodes/+/<kind>``."""
        if kind not in NODE_KINDS:
            raise ValueError(f"unknown topic kind {kind!r}")
        return f"{self.root}/nodes/+/{kind}"

    @staticmethod
    def shared(group: str | None, topic_filter: str) -> str:
        """A shared subscription (``$share/<group>/<filter>``) so several cloud
        workers split one fleet's messages; ``group=None`` gives a plain filter."""
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    # -- parser -----------------------------------------------------------
    def parse(self, topic: str) -> tuple[str, str]:
        """Return ``(node_id, kind)`` of a node-scoped topic.

        Raises :class:`MessageRejected` (``bad_topic``) for anything else.
        """
        head = f"{self.root}/nodes/"
        if not topic.startswith(head):
            raise MessageRejected("bad_topic", f"not under {head}: {topic!r}")
        rest = topic[len(head):]
        node_id, _, kind = rest.partition("/")
        if kind not in NODE_KINDS or not NODE_ID_RE.match(node_id):
            raise MessageRejected("bad_topic", f"unknown node topic {topic!r}")
        return node_id, kind

    def retained(self, kind: str) -> bool:
        return NODE_KINDS[kind][1]

    def qos(self, kind: str) -> int:
        return NODE_KINDS[kind][2]
