"""Check a manifest against the model's REAL tensors.

The model is loaded with ONNX Runtime (a core dependency, the same runtime the
edge node serves it with), so what we check is what will run. Rules:

- every model input must be described by the manifest (the node must feed it);
- every tensor the manifest names must exist, with the same element type and
  rank; a dimension fixed on both sides must agree, a symbolic one (a name or
  null, e.g. the batch) matches anything;
- ``preprocess.input`` / ``postprocess.output`` must name manifest tensors;
- a classifier's labels count must equal its score vector's size when the
  model fixes it.

A manifest that omits ``model.inputs`` / ``model.outputs`` gets them from the
model (:func:`fill_tensors`), which makes any third-party ONNX model
packageable as ``generic`` with only name, version and task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from cloud_sync.manifest import Manifest

from .errors import PackageRejected

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}

Dim = int | str | None


@dataclass(frozen=True)
class ModelTensor:
    name: str
    onnx_type: str
    shape: list[Dim] = field(default_factory=list)

    @property
    def dtype(self) -> str | None:
        """numpy dtype name, or None for a type manifests cannot describe."""
        return _ORT_TYPES.get(self.onnx_type)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSignature:
    inputs: list[ModelTensor]
    outputs: list[ModelTensor]


def _dim(d: Any) -> Dim:
    if isinstance(d, int):
        return d if d >= 0 else None
    return d if isinstance(d, str) and d else None


def describe_model(model: bytes) -> ModelSignature:
    """Input/output tensors of an ONNX model, read by ONNX Runtime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises many types; all mean "not usable"
        raise PackageRejected(
            "bad_model", f"ONNX Runtime cannot load the model: {str(err)[:300]}") from err

    def conv(args: list[Any]) -> list[ModelTensor]:
        return [ModelTensor(a.name, a.type, [_dim(d) for d in (a.shape or [])]) for a in args]

    return ModelSignature(conv(sess.get_inputs()), conv(sess.get_outputs()))


def fill_tensors(raw: dict[str, Any], sig: ModelSignature) -> dict[str, Any]:
    """A copy of manifest dict ``raw`` with model.inputs/outputs taken from the
    model where omitted. Outputs of types a manifest cannot describe (maps,
    sequences) are left out of a filled list."""
    out = dict(raw)
    model = dict(out.get("model") or {})
    if not model.get("inputs"):
        bad = [t.name for t in sig.inputs if t.dtype is None]
        if bad:
            raise PackageRejected("tensor_mismatch", f"model inputs of unsupported type: {bad}")
        model["inputs"] = [t.spec() for t in sig.inputs]
    if not model.get("outputs"):
        model["outputs"] = [t.spec() for t in sig.outputs if t.dtype is not None]
        skipped = [t.name for t in sig.outputs if t.dtype is None]
        if skipped:
            logger.warning("outputs %s are not plain tensors; left out of the manifest", skipped)
    out["model"] = model
    return out


def _compare(kind: str, spec: Any, real: ModelTensor) -> list[str]:
    problems = []
    if real.dtype != spec.dtype:
        problems.append(f"{kind} {spec.name!r}: dtype {spec.dtype} in manifest, "
                        f"{real.dtype or real.onnx_type} in model")
    if spec.shape:
        if len(spec.shape) != len(real.shape):
            problems.append(f"{kind} {spec.name!r}: rank {len(spec.shape)} in manifest "
                            f"{list(spec.shape)}, {len(real.shape)} in model {real.shape}")
        else:
            for i, (a, b) in enumerate(zip(spec.shape, real.shape)):
                if isinstance(a, int) and isinstance(b, int) and a != b:
                    problems.append(f"{kind} {spec.name!r}: dim {i} is {a} in manifest, "
                                    f"{b} in model")
    return problems


def check_tensors(m: Manifest, sig: ModelSignature) -> list[str]:
    """Every way the manifest disagrees with the model, one string each."""
    problems: list[str] = []
    real_in = {t.name: t for t in sig.inputs}
    real_out = {t.name: t for t in sig.outputs}
    for spec in m.model.inputs:
        if spec.name not in real_in:
            problems.append(f"input {spec.name!r} is not a model input "
                            f"(model has {sorted(real_in)})")
        else:
            problems += _compare("input", spec, real_in[spec.name])
    described = {s.name for s in m.model.inputs}
    for name in real_in:
        if name not in described:
            problems.append(f"model input {name!r} is not described in the manifest")
    for spec in m.model.outputs:
        if spec.name not in real_out:
            problems.append(f"output {spec.name!r} is not a model output "
                            f"(model has {sorted(real_out)})")
        else:
            problems += _compare("output", spec, real_out[spec.name])
    if m.preprocess and m.preprocess.input and m.preprocess.input not in described:
        problems.append(f"preprocess.input {m.preprocess.input!r} is not a manifest input")
    outs = {s.name for s in m.model.outputs}
    if m.postprocess and m.postprocess.output and m.postprocess.output not in outs:
        problems.append(f"postprocess.output {m.postprocess.output!r} is not a manifest output")
    return problems


def score_size(m: Manifest, sig: ModelSignature) -> int | None:
    """The classifier's number of classes, when the model or manifest fixes it."""
    name = (m.postprocess.output if m.postprocess and m.postprocess.output
            else m.model.outputs[0].name)
    spec = next((s for s in m.model.outputs if s.name == name), None)
    real = next((t for t in sig.outputs if t.name == name), None)
    for shape in ((real.shape if real else []), (spec.shape if spec else [])):
        if shape and isinstance(shape[-1], int):
            return shape[-1]
    return None


def check_labels(m: Manifest, sig: ModelSignature, labels: list[str] | None) -> list[str]:
    if labels is None or m.task != "classification":
        return []
    n = score_size(m, sig)
    if n is not None and n != len(labels):
        return [f"{len(labels)} labels for a classifier with {n} outputs"]
    return []


def validate_model(m: Manifest, model: bytes, labels: list[str] | None) -> ModelSignature:
    """Raise :class:`PackageRejected` (``tensor_mismatch``) listing every problem."""
    sig = describe_model(model)
    problems = check_tensors(m, sig) + check_labels(m, sig, labels)
    if problems:
        raise PackageRejected("tensor_mismatch", "; ".join(problems))
    return sig
