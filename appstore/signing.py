"""The publisher's Ed25519 key and the set of keys the store trusts.

The private key is a PEM file with mode 0600; its public half is written next
to it as ``<name>.pub`` (PEM) so it can be handed to edge nodes. The store
trusts its own key plus every public key in ``keys/trusted/*.pub`` (PEM, or the
raw key as 64 hex digits), so packages built by other publishers can be
uploaded once their key is placed there.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from cloud_sync.package import key_id as _key_id

from .errors import SigningKeyError

logger = logging.getLogger(__name__)


class SigningKey:
    """An Ed25519 private key with its id; ``sign`` is what write_package wants."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_raw: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id: str = _key_id(self.public_raw)

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> "SigningKey":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise SigningKeyError("no_key", f"cannot read signing key {path}: {err}") from err
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as err:
            raise SigningKeyError(
                "bad_key", f"{path} is not an unencrypted PEM private key") from err
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError("bad_key", f"{path} holds a {type(key).__name__}, not Ed25519")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | Path) -> "SigningKey":
        """Load the key at ``path``, creating (and saving) a new one if missing."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        if key._write(path, exclusive=True) is None:
            # another AppStore worker started on the same data dir made it first:
            # every worker must sign with the one key the nodes trust
            return cls.load(path)
        logger.info("created publisher key %s at %s", key.key_id, path)
        return key

    def save(self, path: str | Path) -> Path:
        """Write the private key (mode 0600) and ``<stem>.pub``; return the .pub path."""
        pub = self._write(path, exclusive=False)
        assert pub is not None
        return pub

    def _write(self, path: str | Path, exclusive: bool) -> Path | None:
        """:meth:`save`; ``exclusive``: never replace an existing key (None then)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if exclusive:
            try:
                os.link(tmp, path)  # fails if the file exists: first writer wins
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        else:
            os.replace(tmp, path)
        pub = path.with_suffix(".pub")
        pub.write_bytes(self.public_pem())
        return pub

    def public_pem(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


def load_public_key(path: str | Path) -> bytes:
    """Raw 32-byte Ed25519 public key from a PEM file or 64 hex digits."""
    path = Path(path)
    data = path.read_bytes()
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SigningKeyError("bad_key", f"{path}: not a PEM public key or 64 hex digits") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError("bad_key", f"{path}: not an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def trusted_keys(own: SigningKey | None, trusted_dir: str | Path) -> dict[str, bytes]:
    """key id -> raw public key: our own plus ``trusted_dir/*.pub``.

    An unreadable .pub file is logged and skipped, never fatal.
    """
    keys: dict[str, bytes] = {}
    if own is not None:
        keys[own.key_id] = own.public_raw
    d = Path(trusted_dir)
    if d.is_dir():
        for p in sorted(d.glob("*.pub")):
            try:
                raw = load_public_key(p)
            except (SigningKeyError, OSError) as err:
                logger.warning("skipping trusted key %s: %s", p, err)
                continue
            keys[_key_id(raw)] = raw
    return keys
