"""Open Inference Protocol v2 tensors <-> numpy arrays, without Python loops.

JSON ``data`` lists, and Triton's binary-tensor extension: with an
``Inference-Header-Content-Length: N`` request header the first N body bytes
are the JSON request and the rest holds the raw bytes of every input that says
``"parameters": {"binary_data_size": K}`` (in order, no copy: ``np.frombuffer``).
Outputs go back binary when the request says ``"parameters":
{"binary_data_output": true}`` or an output asks ``{"binary_data": true}``.
BYTES tensors use Triton's layout (u32 little-endian length + bytes per item).
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from edge_node.worker.tensors import V2_TO_NP, v2_datatype


class V2Error(Exception):
    """An error the API answers as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


_U32 = struct.Struct("<I")
_NP_DTYPE = {v2: np.dtype(n) for v2, n in V2_TO_NP.items() if n != "string"}
_KINDS = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _bad(msg: str) -> V2Error:
    return V2Error(400, msg)


def decode_tensor(obj: object, where: str, binary=None) -> tuple[str, np.ndarray]:
    """One request tensor ``{"name", "shape", "datatype", "data"}`` -> (name, array).

    ``binary`` is a :class:`_Binary` reader for the binary-tensor extension.
    """
    if not isinstance(obj, dict):
        raise _bad(f"{where} must be an object with name, shape, datatype and data")
    name, shape, datatype = obj.get("name"), obj.get("shape"), obj.get("datatype")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}: 'name' must be a non-empty string")
    label = f"input {name!r}"
    if datatype not in V2_TO_NP:
        raise _bad(f"{label}: unsupported datatype {datatype!r}; one of {sorted(V2_TO_NP)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _bad(f"{label}: 'shape' must be a list of non-negative integers")
    params = obj.get("parameters")
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if binary is None:
            raise _bad(f"{label}: binary_data_size needs the Inference-Header-Content-Length "
                       "header")
        return name, binary.take(label, size, datatype, shape)
    if "data" not in obj:
        raise _bad(f"{label}: 'data' is missing (or give binary_data_size with the "
                   "binary-tensor extension)")
    try:
        raw = np.asarray(obj["data"])
    except (ValueError, TypeError) as err:
        raise _bad(f"{label}: 'data' is not a flat or regularly nested list: {err}") from None
    arr = _cast(raw, datatype, label)
    need = math.prod(shape)
    if arr.size != need:
        raise _bad(f"{label}: shape {shape} needs {need} values but 'data' has {arr.size}")
    return name, arr.reshape(shape)


def _cast(raw: np.ndarray, datatype: str, label: str) -> np.ndarray:
    if datatype == "BYTES":
        if raw.size and raw.dtype.kind not in "US":
            raise _bad(f"{label}: BYTES data must be strings")
        return raw.astype(object)
    dt = _NP_DTYPE[datatype]
    kinds = _KINDS[dt.kind]
    if raw.size and raw.dtype.kind not in kinds:
        what = {"f": "numbers", "b": "true/false values"}.get(dt.kind, "integers")
        raise _bad(f"{label}: {datatype} data must be {what}, got {raw.dtype.name} values")
    if dt.kind in "iu" and raw.size and raw.dtype != dt:
        info = np.iinfo(dt)
        if raw.min() < info.min or raw.max() > info.max:
            raise _bad(f"{label}: values out of range for {datatype}")
    return raw.astype(dt, copy=False)


class _Binary:
    """The binary part of a request, handed out input by input."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, label: str, size: object, datatype: str, shape: list[int]) -> np.ndarray:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"{label}: binary_data_size must be a non-negative integer")
        if self.pos + size > len(self.data):
            raise _bad(f"{label}: binary_data_size {size} runs past the end of the body")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        if datatype == "BYTES":
            arr = _split_bytes(chunk, label)
        else:
            dt = _NP_DTYPE[datatype]
            if size % dt.itemsize:
                raise _bad(f"{label}: {size} bytes is not a whole number of {datatype} values")
            arr = np.frombuffer(chunk, dtype=dt)
        need = math.prod(shape)
        if arr.size != need:
            raise _bad(f"{label}: shape {shape} needs {need} values but the binary data has "
                       f"{arr.size}")
        return arr.reshape(shape)


def _split_bytes(chunk: memoryview, label: str) -> np.ndarray:
    items, pos = [], 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise _bad(f"{label}: truncated BYTES element")
        (n,) = _U32.unpack_from(chunk, pos)
        if pos + 4 + n > len(chunk):
            raise _bad(f"{label}: truncated BYTES element")
        items.append(bytes(chunk[pos + 4:pos + 4 + n]).decode("utf-8", "replace"))
        pos += 4 + n
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def decode_infer_request(raw: bytes | dict, header_length: str | None = None
                         ) -> tuple[object, dict[str, np.ndarray], list[str] | None, set | bool]:
    """``(id, {name: array}, requested output names or None, binary outputs)``.

    ``raw`` is the request body (or an already parsed JSON object);
    ``header_length`` the ``Inference-Header-Content-Length`` header, if any.
    The last item is True (every output binary) or the set of output names
    that asked for binary data.
    """
    binary = None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        head = raw
        if header_length is not None:
            try:
                n = int(header_length)
            except ValueError:
                raise _bad("Inference-Header-Content-Length must be an integer") from None
            if not 0 <= n <= len(raw):
                raise _bad(f"Inference-Header-Content-Length {n} is outside the body "
                           f"({len(raw)} bytes)")
            head, binary = raw[:n], _Binary(memoryview(raw)[n:])
        try:
            body = json.loads(bytes(head).decode("utf-8"))
        except ValueError as err:  # UnicodeDecodeError is one
            raise V2Error(400, f"request body is not valid JSON: {err}") from None
    else:
        body = raw
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object with 'inputs'")
    tensors = body.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise _bad("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    for i, obj in enumerate(tensors):
        name, arr = decode_tensor(obj, f"inputs[{i}]", binary)
        if name in inputs:
            raise _bad(f"input {name!r} is given twice")
        inputs[name] = arr
    if binary is not None and binary.pos != len(binary.data):
        raise _bad(f"{len(binary.data) - binary.pos} bytes of binary data are not claimed "
                   "by any input's binary_data_size")
    outputs = body.get("outputs")
    names = None
    params = body.get("parameters")
    want_binary: set[str] | bool = bool(isinstance(params, dict)
                                        and params.get("binary_data_output") is True)
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise _bad("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in outputs]
        if want_binary is False:
            want_binary = {o["name"] for o in outputs if isinstance(o.get("parameters"), dict)
                           and o["parameters"].get("binary_data") is True}
    return body.get("id"), inputs, names, want_binary or False


def encode_tensor(name: str, arr: np.ndarray) -> dict:
    arr = np.asarray(arr)
    data = arr.ravel().tolist()
    if arr.dtype.kind in "OS":
        data = [d.decode("utf-8", "replace") if isinstance(d, bytes) else d for d in data]
    return {"name": name, "datatype": v2_datatype(arr.dtype), "shape": list(arr.shape),
            "data": data}


def _tensor_bytes(arr: np.ndarray) -> bytes | memoryview:
    if arr.dtype.kind in "OUS":
        out = []
        for d in arr.ravel().tolist():
            b = d if isinstance(d, bytes) else str(d).encode("utf-8")
            out += [_U32.pack(len(b)), b]
        return b"".join(out)
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8))


def encode_outputs(head: dict, outputs: list[tuple[str, np.ndarray]], binary: set[str] | bool
                   ) -> tuple[bytes, list]:
    """The JSON response (``head`` + ``"outputs"``) and the binary blobs that follow it."""
    tensors, blobs = [], []
    for name, arr in outputs:
        arr = np.asarray(arr)
        if binary is True or (binary and name in binary):
            blob = _tensor_bytes(arr)
            blobs.append(blob)
            tensors.append({"name": name, "datatype": v2_datatype(arr.dtype),
                            "shape": list(arr.shape),
                            "parameters": {"binary_data_size": memoryview(blob).nbytes}})
        else:
            tensors.append(encode_tensor(name, arr))
    head["outputs"] = tensors
    return _dumps(head).encode(), blobs
