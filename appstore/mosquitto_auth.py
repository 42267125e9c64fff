"""Mosquitto's password file and ACL file, written by the AppStore.

The AppStore owns both files when enrolment is on (``enrolment`` in its config):
they are rendered whole from the database every time a node enrols or is
revoked, written atomically (a temp file in the same folder, fsync, rename) and
the broker is told to reload them (SIGHUP to its pid). A node's password is
never stored: only Mosquitto's own ``$7$`` hash (PBKDF2-SHA512, the format
``mosquitto_passwd`` writes) reaches the database and the password file.

Each node's user may write only the node's upward topics and read only its
downward ones (:data:`cloud_sync.topics.NODE_KINDS`), plus its camera streams'
status; the AppStore's own user may read and write the whole root. So only the
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


def node_acl(topics: Topics, node_id: str) -> list[str]:
    """The ``topic`` lines of one node: its upward kinds write, downward read."""
    lines = []
    for kind, (direction, _retained, _qos) in NODE_KINDS.items():
        access = "write" if direction == "up" else "read"
        lines.append(f"topic {access} {topics.node(node_id, kind)}")
    lines.append(f"topic write {topics.root}/nodes/{node_id}/streams/+/status")
    return lines


def render_acl(topics: Topics, store_user: str, node_ids: Iterable[str]) -> str:
    out = ["# Written by the aidc AppStore (enrolment): every change here is lost.",
           "# No topic line before the first user: anonymous clients get nothing.", "",
           f"user {store_user}", f"topic readwrite {topics.root}/#", ""]
    for node_id in node_ids:
        out += [f"user {node_id}", *node_acl(topics, node_id), ""]
    return "\n".join(out)


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
