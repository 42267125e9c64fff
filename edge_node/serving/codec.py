"""Open Inference Protocol v2 JSON tensors <-> numpy arrays, without Python loops."""

from __future__ import annotations

import math

import numpy as np

from edge_node.worker.tensors import V2_TO_NP, v2_datatype


class V2Error(Exception):
    """An error the API answers as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


def _bad(msg: str) -> V2Error:
    return V2Error(400, msg)


def decode_tensor(obj: object, where: str) -> tuple[str, np.ndarray]:
    """One request tensor ``{"name", "shape", "datatype", "data"}`` -> (name, array)."""
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
    if "data" not in obj:
        raise _bad(f"{label}: 'data' is missing (binary tensor data is not supported)")
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
    dt = np.dtype(V2_TO_NP[datatype])
    kinds = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}[dt.kind]
    if raw.size and raw.dtype.kind not in kinds:
        what = {"f": "numbers", "b": "true/false values"}.get(dt.kind, "integers")
        raise _bad(f"{label}: {datatype} data must be {what}, got {raw.dtype.name} values")
    if dt.kind in "iu" and raw.size and raw.dtype != dt:
        info = np.iinfo(dt)
        if raw.min() < info.min or raw.max() > info.max:
            raise _bad(f"{label}: values out of range for {datatype}")
    return raw.astype(dt, copy=False)


def decode_infer_request(body: object) -> tuple[object, dict[str, np.ndarray], list[str] | None]:
    """``(id, {name: array}, requested output names or None)`` from a request body."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object with 'inputs'")
    tensors = body.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise _bad("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    for i, obj in enumerate(tensors):
        name, arr = decode_tensor(obj, f"inputs[{i}]")
        if name in inputs:
            raise _bad(f"input {name!r} is given twice")
        inputs[name] = arr
    outputs = body.get("outputs")
    names = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise _bad("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in outputs]
    return body.get("id"), inputs, names


def encode_tensor(name: str, arr: np.ndarray) -> dict:
    arr = np.asarray(arr)
    data = arr.ravel().tolist()
    if arr.dtype.kind in "OS":
        data = [d.decode("utf-8", "replace") if isinstance(d, bytes) else d for d in data]
    return {"name": name, "datatype": v2_datatype(arr.dtype), "shape": list(arr.shape),
            "data": data}
