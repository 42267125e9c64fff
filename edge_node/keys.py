"""Trusted publisher keys: which signers' apps this node runs."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud_sync.package import key_id

logger = logging.getLogger(__name__)


def load_public_key(path: Path) -> bytes:
    """Raw 32-byte Ed25519 public key from a PEM, base64 or raw file."""
    data = path.read_bytes()
    if b"BEGIN PUBLIC KEY" in data:
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if len(data) == 32:
        return data
    raw = base64.b64decode(data.strip(), validate=True)
    if len(raw) != 32:
        raise ValueError(f"{path}: not a 32-byte Ed25519 public key")
    return raw


def trusted_keys(files: list[Path], keys_dir: Path) -> dict[str, bytes]:
    """key id -> raw public key, from the config's files and ``keys_dir/*.pub``."""
    out: dict[str, bytes] = {}
    paths = list(files) + (sorted(keys_dir.glob("*.pub")) if keys_dir.is_dir() else [])
    for p in paths:
        try:
            raw = load_public_key(p)
        except (OSError, ValueError) as err:
            logger.warning("ignoring trusted key %s: %s", p, err)
            continue
        out[key_id(raw)] = raw
    return out
