"""The app package: one zip file, signed by its publisher, addressed by sha256.

Layout::

    manifest.json      the :class:`~cloud_sync.manifest.Manifest`
    model.onnx         (the file named by manifest.model.file)
    labels.txt         optional, one label per line
    signature.json     {"alg": "ed25519", "key_id": ..., "files": {name: sha256},
                        "signature": base64(Ed25519(canonical JSON of files))}

The signature covers the sha256 of every other member, so a package is
verified member by member, and no member may be added or removed after
signing. The package's *address* is the sha256 of the whole zip file, checked
by the receiver before the zip is opened.

Signing needs a private key and lives with the publisher (``appstore``); this
module takes a signing callable so it never touches one. Verification needs
only public keys and is used by the edge node.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import PackageError
from .manifest import Manifest, load_manifest

SIGNATURE_FILE = "signature.json"
MANIFEST_FILE = "manifest.json"
MAX_MEMBERS = 64
MAX_UNPACKED_BYTES = 4 << 30  # 4 GiB: refuse zip bombs


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def key_id(public_key_raw: bytes) -> str:
    """Short stable id of an Ed25519 public key (first 16 hex of its sha256)."""
    return sha256_bytes(public_key_raw)[:16]


def _signed_payload(files: Mapping[str, str]) -> bytes:
    return json.dumps(dict(sorted(files.items())), sort_keys=True, separators=(",", ":")).encode()


def write_package(
    out: str | Path,
    members: Mapping[str, bytes],
    sign: Callable[[bytes], bytes],
    signer_key_id: str,
) -> str:
    """Write a signed package holding ``members`` (must include manifest.json).

    ``sign`` signs bytes with the publisher's Ed25519 private key. Returns the
    package's sha256 address. The zip is written deterministically (fixed
    timestamps, sorted names) so the same inputs give the same address.
    """
    if MANIFEST_FILE not in members:
        raise PackageError("bad_manifest", "no manifest.json")
    if SIGNATURE_FILE in members:
        raise PackageError("corrupt", f"{SIGNATURE_FILE} is reserved")
    files = {name: sha256_bytes(data) for name, data in members.items()}
    sig = sign(_signed_payload(files))
    signature = {
        "alg": "ed25519",
        "key_id": signer_key_id,
        "files": files,
        "signature": base64.b64encode(sig).decode(),
    }
    all_members = dict(members)
    all_members[SIGNATURE_FILE] = json.dumps(signature, indent=1, sort_keys=True).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(all_members):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, all_members[name])
    data = buf.getvalue()
    Path(out).write_bytes(data)
    return sha256_bytes(data)


@dataclass
class PackageContents:
    """A verified package, read into memory."""

    sha256: str
    manifest: Manifest
    key_id: str
    members: dict[str, bytes]

    @property
    def model_bytes(self) -> bytes:
        return self.members[self.manifest.model.file]

    @property
    def labels(self) -> list[str] | None:
        pp = self.manifest.postprocess
        name = pp.labels_file if pp else None
        if not name or name not in self.members:
            return None
        return [ln.strip() for ln in self.members[name].decode().splitlines() if ln.strip()]


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """One member, refusing more bytes than the zip directory declares."""
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError,
            NotImplementedError, zipfile.LargeZipFile) as err:
        raise PackageError("corrupt", f"unreadable member {info.filename!r}: {err}") from err
    if len(data) != info.file_size:
        raise PackageError("corrupt", f"member {info.filename!r} is not the declared size")
    return data


def _verified_signature(zf: zipfile.ZipFile,
                        trusted_keys: Mapping[str, bytes]) -> tuple[str, dict[str, str]]:
    """(key id, {member: sha256}) from the package's ``signature.json``, its
    Ed25519 signature checked against ``trusted_keys``."""
    sig_info = zf.getinfo(SIGNATURE_FILE)
    if sig_info.file_size > 1 << 20:
        raise PackageError("bad_signature", f"{SIGNATURE_FILE} is too large")
    try:
        sig = json.loads(_read_member(zf, sig_info))
        files = sig["files"]
        kid = sig["key_id"]
        if not isinstance(kid, str) or not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise PackageError("bad_signature", f"malformed {SIGNATURE_FILE}")
        if sig.get("alg") != "ed25519":
            raise PackageError("bad_signature", f"unsupported alg {sig.get('alg')!r}")
        signature = base64.b64decode(sig["signature"], validate=True)
    except PackageError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise PackageError("bad_signature", f"malformed {SIGNATURE_FILE}: {err}") from err
    if kid not in trusted_keys:
        raise PackageError("untrusted_key", f"signed by unknown key {kid}")
    try:
        Ed25519PublicKey.from_public_bytes(trusted_keys[kid]).verify(
            signature, _signed_payload(files)
        )
    except (InvalidSignature, ValueError) as err:
        raise PackageError("bad_signature", "signature does not verify") from err
    return kid, files


def signed_members(path: str | Path,
                   trusted_keys: Mapping[str, bytes]) -> dict[str, tuple[str, int]]:
    """``{member: (sha256, size)}`` as the package at ``path`` signed them: what an
    unpacked copy must hold. Reads only the zip's directory and ``signature.json``
    (the signature is checked; the members themselves and the zip's own sha256
    are not -- :func:`read_package` does that). :class:`PackageError` if not."""
    try:
        with zipfile.ZipFile(path) as zf:
            sizes = {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}
            if SIGNATURE_FILE not in sizes:
                raise PackageError("unsigned", f"no {SIGNATURE_FILE}")
            _, files = _verified_signature(zf, trusted_keys)
    except PackageError:
        raise
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as err:
        raise PackageError("corrupt", f"cannot read {Path(path).name}: {err}") from err
    if set(files) != set(sizes) - {SIGNATURE_FILE}:
        raise PackageError("corrupt", "members differ from the signed list")
    return {name: (digest, sizes[name]) for name, digest in files.items()}


def read_package(
    path: str | Path,
    trusted_keys: Mapping[str, bytes],
    expected_sha256: str | None = None,
) -> PackageContents:
    """Open and verify a package; raise :class:`PackageError` with a reason code.

    ``trusted_keys`` maps key id -> raw 32-byte Ed25519 public key.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PackageError("corrupt", f"cannot read {path}: {err}") from err
    digest = sha256_bytes(raw)
    if expected_sha256 is not None and digest != expected_sha256:
        raise PackageError("hash_mismatch", f"expected {expected_sha256}, got {digest}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise PackageError("corrupt", f"not a zip file: {err}") from err
    if len(infos) > MAX_MEMBERS:
        raise PackageError("too_large", f"{len(infos)} members > {MAX_MEMBERS}")
    if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
        raise PackageError("too_large", "unpacked size over the limit")
    names = [i.filename for i in infos if not i.is_dir()]
    for name in names:
        if "/" in name or "\\" in name or name.startswith(".") or not name:
            raise PackageError("corrupt", f"member name not allowed: {name!r}")
    if len(set(names)) != len(names):
        raise PackageError("corrupt", "duplicate member names")
    if SIGNATURE_FILE not in names:
        raise PackageError("unsigned", f"no {SIGNATURE_FILE}")
    # The signature first: nothing else is decompressed before it verifies.
    kid, files = _verified_signature(zf, trusted_keys)
    others = set(names) - {SIGNATURE_FILE}
    if set(files) != others:
        extra = sorted(set(files) ^ others)
        raise PackageError("corrupt", f"members differ from the signed list: {extra}")
    members: dict[str, bytes] = {}
    for info in infos:
        if info.filename == SIGNATURE_FILE or info.is_dir():
            continue
        data = _read_member(zf, info)
        if sha256_bytes(data) != files[info.filename]:
            raise PackageError("bad_signature", f"{info.filename} changed after signing")
        members[info.filename] = data
    try:
        manifest_raw = json.loads(members[MANIFEST_FILE])
    except (KeyError, ValueError) as err:
        raise PackageError("bad_manifest", f"unreadable manifest.json: {err}") from err
    manifest = load_manifest(manifest_raw)
    if manifest.model.file not in members:
        raise PackageError("corrupt", f"model file {manifest.model.file!r} missing")
    return PackageContents(sha256=digest, manifest=manifest, key_id=kid, members=members)
