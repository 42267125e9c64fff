"""The worker socket's wire format: length-prefixed frames, a JSON head, raw tensor bytes.

No pickle crosses the socket: a message is a dict of JSON values in which every
numpy array and every bytes value is replaced by a reference to a blob that
follows the head as raw bytes. The receiver's arrays are ``np.frombuffer``
views of the one receive buffer (writable, 16-byte aligned, no copy)::

    frame = u32 frame_len | u32 head_len | head (UTF-8 JSON) | pad | blob0 | pad | blob1 ...
    head  = {"m": message with refs, "b": [[offset, length], ...]}   offsets from data start
    ref   = {"$nd": i, "dtype": "float32", "shape": [...]}  |  {"$b": i}

``data start`` is ``align16(8 + head_len)`` from the frame start. String
tensors travel as Triton's BYTES layout (u32 length + UTF-8 per element).
The two hot messages -- an ``infer`` request and its ok reply, tensors only --
take a cached path on both sides: the head for a given (names, dtypes, shapes)
is built once and reused, and a known head bytes-string maps straight to where
each tensor sits, so steady serving does no JSON work at all. The format on the
socket is the same either way.

The connection handshake (:func:`server_hello`, :func:`client_handshake`,
:func:`server_handshake`) is an HMAC-SHA256 challenge both ways when an auth
key is set.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct

import numpy as np

_HDR = struct.Struct("<II")
_U32 = struct.Struct("<I")
ALIGN = 16
MAX_FRAME = 1 << 31  # a frame length above this is a broken stream, not a request
MAGIC = b"AIDCW1"
HELLO_LEN = len(MAGIC) + 1 + 32
DIGEST_LEN = 32


#: socket buffer asked for on worker connections: an image-sized tensor (a 224x224x3
#: float32 input is 602 KB) then crosses in one write instead of a dozen wake-ups
SOCKET_BUFFER = 4 << 20


def tune(sock) -> None:
    """Big send/receive buffers on a worker connection (the kernel caps them; best effort)."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


class FrameError(Exception):
    """The bytes on the socket are not a well-formed frame."""


def _pad(n: int) -> int:
    return -n % ALIGN


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _strings_to_bytes(arr: np.ndarray) -> bytes:
    out = []
    for v in arr.ravel().tolist():
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        out.append(_U32.pack(len(b)))
        out.append(b)
    return b"".join(out)


def _bytes_to_strings(buf, shape: list[int]) -> np.ndarray:
    items, pos, mv = [], 0, memoryview(buf)
    while pos < len(mv):
        (n,) = _U32.unpack_from(mv, pos)
        items.append(bytes(mv[pos + 4:pos + 4 + n]).decode("utf-8", "replace"))
        pos += 4 + n
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


_SCALARS = (str, int, float, bool, type(None))
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default)


class _Packer:
    def __init__(self) -> None:
        self.blobs: list = []
        self.places: list[list[int]] = []
        self.end = 0

    def blob(self, data) -> int:
        n = memoryview(data).nbytes
        self.blobs.append(data)
        self.places.append([self.end, n])
        self.end += n + _pad(n)
        return len(self.blobs) - 1

    def pack(self, obj: object) -> object:
        t = type(obj)
        if t in _SCALARS:
            return obj
        if t is dict:
            return {k: self.pack(v) for k, v in obj.items()}
        if t is np.ndarray:
            if obj.dtype.kind in "OUS":
                i = self.blob(_strings_to_bytes(obj))
                return {"$nd": i, "dtype": "string", "shape": list(obj.shape)}
            arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
            i = self.blob(memoryview(arr.reshape(-1).view(np.uint8)))
            return {"$nd": i, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        if t in (bytes, bytearray, memoryview):
            return {"$b": self.blob(obj)}
        if t in (list, tuple):
            return [self.pack(v) for v in obj]
        if isinstance(obj, np.ndarray):
            return self.pack(np.asarray(obj))
        return obj


CACHE_SIZE = 256
_enc_cache: dict[tuple, tuple[bytes, list[bytes]]] = {}
_dec_cache: dict[bytes, tuple] = {}


def _hot(msg: object) -> tuple[str, object, dict] | None:
    """("req" | "rep", output names, tensors) for the two hot message shapes."""
    if type(msg) is not dict:
        return None
    if len(msg) == 3 and msg.get("op") == "infer" and "inputs" in msg and "outputs" in msg:
        extra = msg["outputs"]
        if extra is not None:
            if type(extra) is not list or not all(type(n) is str for n in extra):
                return None
            extra = tuple(extra)
        tensors, kind = msg["inputs"], "req"
    elif len(msg) == 2 and msg.get("ok") is True and "outputs" in msg:
        tensors, kind, extra = msg["outputs"], "rep", None
    else:
        return None
    if type(tensors) is not dict or not tensors:
        return None
    return kind, extra, tensors


def _tensor_sig(tensors: dict) -> tuple | None:
    sig = []
    for name, arr in tensors.items():
        if (type(arr) is not np.ndarray or arr.dtype.kind in "OUSV"
                or not arr.flags.c_contiguous or type(name) is not str):
            return None
        sig.append((name, arr.dtype.str, arr.shape))
    return tuple(sig)


def encode(msg: object) -> list:
    """``msg`` -> the buffers of one frame, for ``sendmsg`` (no tensor is copied)."""
    hot = _hot(msg)
    key = None
    if hot is not None:
        sig = _tensor_sig(hot[2])
        if sig is not None:
            key = (hot[0], hot[1], sig)
            cached = _enc_cache.get(key)
            if cached is not None:
                prefix, pads = cached
                parts = [prefix]
                for arr, pad in zip(hot[2].values(), pads, strict=True):
                    parts.append(memoryview(arr.reshape(-1).view(np.uint8)))
                    if pad:
                        parts.append(pad)
                return parts
    parts = _encode(msg)
    if key is not None:
        if len(_enc_cache) >= CACHE_SIZE:
            _enc_cache.clear()
        pads = [bytes(_pad(a.nbytes)) for a in hot[2].values()]
        _enc_cache[key] = (bytes(parts[0]) + parts[1] + parts[2], pads)
    return parts


def _encode(msg: object) -> list:
    p = _Packer()
    head = _ENCODER.encode({"m": p.pack(msg), "b": p.places}).encode()
    start = 8 + len(head)
    total = start + _pad(start) + p.end if p.blobs else start
    parts = [_HDR.pack(total, len(head)), head]
    if p.blobs:
        parts.append(bytes(_pad(start)))
        for b, (_, n) in zip(p.blobs, p.places, strict=True):
            parts.append(b)
            if _pad(n):
                parts.append(bytes(_pad(n)))
    return parts


def decode(frame: bytearray | bytes) -> object:
    """One whole frame (as :func:`read_frame` returns it) -> the message."""
    try:
        total, head_len = _HDR.unpack_from(frame, 0)
    except struct.error as err:
        raise FrameError(f"bad frame head: {err}") from None
    head_bytes = bytes(memoryview(frame)[8:8 + head_len])
    plan = _dec_cache.get(head_bytes)
    if plan is not None and total == len(frame):
        kind, extra, base, tensors = plan
        arrays = {name: np.frombuffer(frame, dt, count, base + off).reshape(shape)
                  for name, dt, count, off, shape in tensors}
        if kind == "req":
            return {"op": "infer", "inputs": arrays,
                    "outputs": None if extra is None else list(extra)}
        return {"ok": True, "outputs": arrays}
    msg = _decode(frame, total, head_len, head_bytes)
    _remember(head_bytes, msg, 8 + head_len + _pad(8 + head_len), total)
    return msg


def _remember(head_bytes: bytes, msg: object, base: int, total: int) -> None:
    """Cache how to decode this head again, when ``msg`` is one of the hot shapes."""
    hot = _hot(msg)
    if hot is None or _tensor_sig(hot[2]) is None:
        return
    tensors, off = [], 0
    for name, arr in hot[2].items():
        tensors.append((name, arr.dtype, arr.size, off, arr.shape))
        off += arr.nbytes + _pad(arr.nbytes)
    if base + off != total:
        return  # not laid out the way encode() lays it out: never take the fast path
    if len(_dec_cache) >= CACHE_SIZE:
        _dec_cache.clear()
    _dec_cache[head_bytes] = (hot[0], hot[1], base, tuple(tensors))


def _decode(frame, total: int, head_len: int, head_bytes: bytes) -> object:
    try:
        head = json.loads(head_bytes)
        places, body = head["b"], head["m"]
    except (ValueError, KeyError, TypeError) as err:
        raise FrameError(f"bad frame head: {err}") from None
    base = 8 + head_len + _pad(8 + head_len)
    if total != len(frame):
        raise FrameError(f"frame says {total} bytes but has {len(frame)}")

    def blob(i: int) -> memoryview:
        off, n = places[i]
        if base + off + n > total:
            raise FrameError("blob outside the frame")
        return memoryview(frame)[base + off:base + off + n]

    def unpack(obj: object) -> object:
        if isinstance(obj, dict):
            if "$nd" in obj:
                data, shape = blob(obj["$nd"]), obj["shape"]
                if obj["dtype"] == "string":
                    return _bytes_to_strings(data, shape)
                return np.frombuffer(data, dtype=np.dtype(obj["dtype"])).reshape(shape)
            if "$b" in obj:
                return bytes(blob(obj["$b"]))
            return {k: unpack(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [unpack(v) for v in obj]
        return obj

    try:
        return unpack(body)
    except FrameError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise FrameError(f"bad tensor in frame: {err}") from None


def frame_length(prefix) -> int:
    """The whole frame's length from its first 8 bytes."""
    total, head_len = _HDR.unpack_from(prefix, 0)
    if total < 8 + head_len or total > MAX_FRAME:
        raise FrameError(f"bad frame length {total}")
    return total


# --- blocking socket I/O (the worker's threads and the sync client) -----------


def send(sock, parts: list) -> None:
    """Write one encoded frame; ``sendmsg`` first, the rest (if any) with ``sendall``."""
    sent = sock.sendmsg(parts)
    total = sum(memoryview(p).nbytes for p in parts)
    if sent == total:
        return
    for p in parts:
        mv = memoryview(p).cast("B")
        if sent >= mv.nbytes:
            sent -= mv.nbytes
            continue
        sock.sendall(mv[sent:])
        sent = 0


def _recv_into(sock, mv: memoryview) -> None:
    while mv.nbytes:
        n = sock.recv_into(mv)
        if not n:
            raise EOFError("connection closed mid-frame")
        mv = mv[n:]


def read_frame(sock, first: int = 65536) -> bytearray | None:
    """One whole frame (a writable buffer), or None at a clean end of stream."""
    data = sock.recv(first)  # one syscall, no zero-filled buffer: the common small frame
    if not data:
        return None
    n = len(data)
    while n < 8:
        more = sock.recv(first)
        if not more:
            raise EOFError("connection closed mid-frame")
        data += more
        n = len(data)
    total = frame_length(data)
    if n > total:
        raise FrameError("bytes after the frame (requests must wait for their reply)")
    buf = bytearray(total) if n < total else bytearray(data)
    if n < total:
        buf[:n] = data
        _recv_into(sock, memoryview(buf)[n:])
    return buf


# --- handshake ----------------------------------------------------------------


def server_hello(authkey: bytes | None) -> tuple[bytes, bytes]:
    """(hello to send, the nonce it carries)."""
    nonce = os.urandom(32)
    return MAGIC + (b"\x01" if authkey else b"\x00") + nonce, nonce


def _mac(key: bytes, tag: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, tag + nonce, hashlib.sha256).digest()


def client_answer(hello: bytes, authkey: bytes | None) -> tuple[bytes, bytes | None]:
    """The client's reply to a hello (b"" when no auth) and the nonce it expects signed.

    Raises :class:`PermissionError` when the two sides disagree about auth.
    """
    if len(hello) != HELLO_LEN or not hello.startswith(MAGIC):
        raise FrameError("not an aidc worker socket (bad hello)")
    needs = hello[len(MAGIC)] == 1
    if needs and not authkey:
        raise PermissionError("the worker requires an auth key")
    if authkey and not needs:
        raise PermissionError("the worker does not authenticate itself")
    if not needs:
        return b"", None
    mine = os.urandom(32)
    return _mac(authkey, b"c", hello[len(MAGIC) + 1:]) + mine, mine


def client_verify(authkey: bytes, nonce: bytes, proof: bytes) -> None:
    if not hmac.compare_digest(proof, _mac(authkey, b"s", nonce)):
        raise PermissionError("the worker's proof does not match the auth key")


def server_check(authkey: bytes, nonce: bytes, answer: bytes) -> bytes:
    """Verify a client's answer; return the proof to send back."""
    if len(answer) != 2 * DIGEST_LEN or not hmac.compare_digest(
            answer[:DIGEST_LEN], _mac(authkey, b"c", nonce)):
        raise PermissionError("client failed authentication")
    return _mac(authkey, b"s", answer[DIGEST_LEN:])


def recv_exact(sock, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def client_handshake(sock, authkey: bytes | None) -> None:
    """Blocking client side of the handshake (raises PermissionError/FrameError/OSError)."""
    answer, mine = client_answer(recv_exact(sock, HELLO_LEN), authkey)
    if mine is None:
        return
    sock.sendall(answer)
    try:
        proof = recv_exact(sock, DIGEST_LEN)
    except (EOFError, ConnectionError) as err:
        raise PermissionError("the worker refused the auth key") from err
    client_verify(authkey, mine, proof)


def server_handshake(sock, authkey: bytes | None) -> None:
    """Blocking worker side: hello, then (with a key) check the answer and prove ourselves."""
    hello, nonce = server_hello(authkey)
    sock.sendall(hello)
    if authkey:
        try:
            proof = server_check(authkey, nonce, recv_exact(sock, 2 * DIGEST_LEN))
        except PermissionError:
            sock.sendall(bytes(DIGEST_LEN))  # a proof that never verifies: "refused"
            raise
        sock.sendall(proof)
