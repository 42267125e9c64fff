"""Tensor specs shared by the worker and the HTTP layer.

Three spellings of an element type meet here: ONNX Runtime's
(``tensor(float)``), numpy's / the manifest's (``float32``) and the Open
Inference Protocol v2's (``FP32``). Shapes use ``-1`` for a symbolic dim, as v2
metadata does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BadInput

ORT_TO_NP = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint64)": "uint64",
    "tensor(uint32)": "uint32",
    "tensor(uint16)": "uint16",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}
NP_TO_V2 = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "string": "BYTES",
}
V2_TO_NP = {v: k for k, v in NP_TO_V2.items()}


_NAMES: dict[np.dtype, str] = {}  # dtype.name is slow (Python code in numpy 2): cache it
_V2: dict[np.dtype, str] = {}


def np_name(dtype: np.dtype) -> str:
    """The manifest spelling of a numpy dtype; str/bytes/object arrays are ``string``."""
    name = _NAMES.get(dtype)
    if name is None:
        name = "string" if dtype.kind in "OUS" else dtype.name
        if len(_NAMES) < 256:
            _NAMES[dtype] = name
    return name


def v2_datatype(dtype: np.dtype) -> str:
    v2 = _V2.get(dtype)
    if v2 is None:
        v2 = NP_TO_V2.get(np_name(dtype), dtype.name.upper())
        if len(_V2) < 256:
            _V2[dtype] = v2
    return v2


@dataclass(frozen=True)
class Spec:
    """One real model tensor: name, manifest dtype name, shape (-1 = symbolic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_ort(cls, node) -> Spec:
        dtype = ORT_TO_NP.get(node.type, node.type)
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
        return cls(node.name, dtype, shape)

    @property
    def is_tensor(self) -> bool:
        return self.dtype in NP_TO_V2

    def describe(self) -> str:
        return f"{NP_TO_V2.get(self.dtype, self.dtype)} {list(self.shape)}"

    def to_v2(self) -> dict:
        return {"name": self.name, "datatype": NP_TO_V2.get(self.dtype, self.dtype),
                "shape": list(self.shape)}

    def check(self, arr: object) -> None:
        """Raise :class:`BadInput` unless ``arr`` fits this input's dtype and shape."""
        if not isinstance(arr, np.ndarray):
            raise BadInput(f"input {self.name!r} must be a numpy array, not {type(arr).__name__}")
        got = np_name(arr.dtype)
        if got != self.dtype:
            raise BadInput(
                f"input {self.name!r} has datatype {v2_datatype(arr.dtype)} but the model "
                f"expects {NP_TO_V2.get(self.dtype, self.dtype)}"
            )
        if len(arr.shape) != len(self.shape) or any(
            want >= 0 and got_d != want for got_d, want in zip(arr.shape, self.shape, strict=True)
        ):
            raise BadInput(
                f"input {self.name!r} has shape {list(arr.shape)} but the model expects "
                f"{list(self.shape)} (-1 = any size)"
            )


def check_feeds(feeds: object, inputs: dict[str, Spec]) -> dict[str, np.ndarray]:
    """Validate an infer request's inputs against the model's; 400-worthy errors."""
    if not isinstance(feeds, dict) or not feeds:
        raise BadInput("inputs must be a non-empty mapping of input name to array")
    unknown = [n for n in feeds if n not in inputs]
    if unknown:
        raise BadInput(f"unknown input {unknown[0]!r}; the model's inputs are {sorted(inputs)}")
    missing = [n for n in inputs if n not in feeds]
    if missing:
        spec = inputs[missing[0]]
        raise BadInput(f"missing input {spec.name!r} ({spec.describe()})")
    for name, arr in feeds.items():
        inputs[name].check(arr)
    return feeds


def check_outputs(names: object, outputs: dict[str, Spec]) -> list[str]:
    """Requested output names (``None`` = every tensor output), validated."""
    if names is None:
        return [n for n, s in outputs.items() if s.is_tensor]
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise BadInput("outputs must be a list of output names")
    for n in names:
        if n not in outputs:
            raise BadInput(f"unknown output {n!r}; the model's outputs are {sorted(outputs)}")
    return list(dict.fromkeys(names))
