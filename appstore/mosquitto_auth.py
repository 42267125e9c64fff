"""Mosquitto's password file and ACL file, written by the AppStore.

The AppStore owns both files when enrolment is on (``enrolment`` in its config):
they are rendered whole from the database every time a node enrols or is
revoked, written atomically (a temp file in the same folder, fsync, rename) and
the broker is told to reload them (SIGHUP to its pid). A node's password is
never stored: only Mosquitto's own ``$7$`` hash (PBKDF2-SHA512, the format
``mosquitto_passwd`` writes) reaches the database and the password file.

Each node's user may write only the node's upward topics and read only its
downward ones (:data:`cloud_sync.topics.NODE_KINDS`), plus its camera streams'
status; the AppStore's own user may read and write the whole root. The rules
are defined once (:func:`node_rules`, :func:`store_rules`); a clustered broker
gets the same decisions from them through :mod:`appstore.broker_hooks`. So only the
AppStore can send a node remote operations (``commands``: the node reads it) and
only the node answers them (``results``: the node writes it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import signal
from collections.abc import Iterable
from pathlib import Path

from cloud_sync.atomic import write_atomic as _write_atomic
from cloud_sync.topics import NODE_KINDS, Topics

logger = logging.getLogger(__name__)

#: what ``mosquitto_passwd`` 2.0 uses; the passwords are 256 random bits, so
#: more rounds would only slow every connect down
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``, as Mosquitto reads it."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Check ``password`` against a ``$7$`` hash (ours or ``mosquitto_passwd``'s)."""
    try:
        _, kind, iterations, salt, dk = encoded.split("$")
        if kind != "7":
            return False
        want = base64.b64decode(dk)
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt),
                                  int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(want, got)


#: one rule of a user: (access, topic filter), access ``read``, ``write`` or
#: ``readwrite`` as in Mosquitto's ACL file. The one definition of who may do
#: what: the ACL file is rendered from it, and the broker hooks of clustered
#: brokers (:mod:`appstore.broker_hooks`) decide with :func:`allowed` on it.
Rule = tuple[str, str]


def node_rules(topics: Topics, node_id: str) -> list[Rule]:
    """One node's rules: its upward kinds write, its downward ones read, and the
    status of its camera streams write."""
    rules: list[Rule] = []
    for kind, (direction, _retained, _qos) in NODE_KINDS.items():
        rules.append(("write" if direction == "up" else "read", topics.node(node_id, kind)))
    rules.append(("write", f"{topics.root}/nodes/{node_id}/streams/+/status"))
    return rules


def store_rules(topics: Topics) -> list[Rule]:
    """The AppStore's own user: the whole root, read and write."""
    return [("readwrite", f"{topics.root}/#")]


def node_acl(topics: Topics, node_id: str) -> list[str]:
    """The ``topic`` lines of one node: its upward kinds write, downward read."""
    return [f"topic {access} {topic}" for access, topic in node_rules(topics, node_id)]


def render_acl(topics: Topics, store_user: str, node_ids: Iterable[str]) -> str:
    out = ["# Written by the aidc AppStore (enrolment): every change here is lost.",
           "# No topic line before the first user: anonymous clients get nothing.", "",
           f"user {store_user}", *(f"topic {a} {t}" for a, t in store_rules(topics)), ""]
    for node_id in node_ids:
        out += [f"user {node_id}", *node_acl(topics, node_id), ""]
    return "\n".join(out)


def _levels_match(pattern: list[str], levels: list[str], subscribe: bool) -> bool:
    """Whether ``levels`` (a topic, or with ``subscribe`` a filter) lies within the
    filter ``pattern``: ``#`` takes the rest, ``+`` one level; a filter's own
    wildcards must be covered by the pattern's (``+`` by ``+`` or ``#``)."""
    for i, p in enumerate(pattern):
        if p == "#":
            return True
        if i >= len(levels):
            return False
        lv = levels[i]
        if p == "+":
            if lv == "#":
                return False
            continue
        if p != lv or (not subscribe and lv in ("+", "#")):
            return False
    return len(levels) == len(pattern)


def allowed(rules: Iterable[Rule], action: str, topic: str) -> bool:
    """Mosquitto's decision for ``action`` (``publish`` or ``subscribe``) on
    ``topic`` under ``rules``: a publish needs a ``write`` rule matching the
    topic (a topic with wildcards is never published), a subscription a
    ``read`` rule covering its whole filter; ``$share/<group>/`` is taken off
    first, as Mosquitto does."""
    if action not in ("publish", "subscribe"):
        raise ValueError(f"unknown action {action!r}")
    if action == "subscribe" and topic.startswith("$share/"):
        parts = topic.split("/", 2)
        if len(parts) < 3 or not parts[1]:
            return False
        topic = parts[2]
    if not topic or (action == "publish" and ("+" in topic or "#" in topic)):
        return False
    levels = topic.split("/")
    if "#" in levels[:-1] or any(("+" in lv or "#" in lv) and len(lv) > 1 for lv in levels):
        return False  # not a valid filter
    need = "write" if action == "publish" else "read"
    return any(need in access and _levels_match(t.split("/"), levels, action == "subscribe")
               for access, t in rules)


def render_passwords(users: Iterable[tuple[str, str]]) -> str:
    """``user:hash`` lines."""
    return "".join(f"{user}:{pw_hash}\n" for user, pw_hash in users)


def write_atomic(path: Path, text: str, mode: int = 0o640, group: str | None = None) -> None:
    """The broker's files: :func:`cloud_sync.atomic.write_atomic`, 0640 by default."""
    _write_atomic(path, text, mode=mode, group=group)


def broker_pid(pid: int | None, pid_file: Path | None) -> int | None:
    """The broker's pid: given, or read from its ``pid_file`` (Mosquitto's own)."""
    if pid is not None:
        return pid
    if pid_file is None:
        return None
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError) as err:
        logger.warning("cannot read the broker's pid from %s: %s", pid_file, err)
        return None


def reload_broker(pid: int | None) -> bool:
    """SIGHUP the broker so it rereads its password and ACL files. False (and a
    warning) when there is no pid or no such process."""
    if pid is None:
        logger.warning("broker files written, but no broker pid is configured "
                       "(enrolment.broker_pid / broker_pid_file): reload the broker yourself")
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as err:
        logger.warning("cannot signal the broker (pid %d) to reload: %s", pid, err)
        return False
    logger.info("broker (pid %d) told to reload its password and ACL files", pid)
    return True
