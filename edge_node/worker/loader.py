"""Load an app dir into one ONNX Runtime session and check it against its manifest.

An *app dir* holds ``manifest.json``, the model file it names and optionally a
labels file. :func:`load_app` refuses (with :class:`ModelMismatch`) a model whose
real inputs/outputs differ from what the manifest declares: names, dtypes,
ranks and fixed dims. Symbolic dims on either side match anything; a declared
shape of ``[]`` means "not declared" and only the name and dtype are checked.

The session is built from :class:`~edge_node.resources.slices.WorkerSettings`
(threads, spinning, execution provider); :meth:`LoadedApp.runtime` reports the
settings actually in effect, read back from the session and the OS. A provider
this ONNX Runtime build lacks, or one that fails to initialise (ORT would
silently fall back to CPU), raises :class:`UnusableSettings`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from cloud_sync.manifest import Manifest, TensorSpec, load_manifest

from ..resources.slices import WorkerSettings
from .errors import ModelMismatch, WorkerException
from .tensors import Spec

logger = logging.getLogger(__name__)
SPIN_KEY = "session.intra_op.allow_spinning"


class UnusableSettings(WorkerException):
    """The worker cannot run as its slice says: a provider this ONNX Runtime lacks,
    a core the box lacks."""


@dataclass
class LoadedApp:
    app_dir: Path
    manifest: Manifest
    session: ort.InferenceSession
    inputs: dict[str, Spec]
    outputs: dict[str, Spec]
    labels: list[str] | None
    settings: WorkerSettings | None = None

    def runtime(self) -> dict:
        """The settings in effect now: threads, spinning, affinity, providers."""
        so = self.session.get_session_options()
        providers = self.session.get_providers()
        options = self.session.get_provider_options()
        return {
            "intra_op_threads": so.intra_op_num_threads,
            "inter_op_threads": so.inter_op_num_threads,
            "spin": so.get_session_config_entry(SPIN_KEY) == "1",
            "affinity": sorted(os.sched_getaffinity(0)),
            "providers": providers,
            "provider_options": {p: options.get(p, {}) for p in providers
                                 if p != "CPUExecutionProvider"},
        }

    def meta(self) -> dict:
        m = self.manifest
        return {
            "name": m.name,
            "version": m.version,
            "task": m.task,
            "inputs": [s.to_v2() for s in self.inputs.values()],
            "outputs": [s.to_v2() for s in self.outputs.values() if s.is_tensor],
            "classify": m.preprocess is not None and m.postprocess is not None,
            "runtime": self.runtime(),
        }


def read_labels(app_dir: Path, manifest: Manifest) -> list[str] | None:
    name = manifest.postprocess.labels_file if manifest.postprocess else None
    if not name or not (app_dir / name).is_file():
        return None
    text = (app_dir / name).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _check_one(kind: str, decl: TensorSpec, real: dict[str, Spec]) -> list[str]:
    spec = real.get(decl.name)
    if spec is None:
        return [(f"{kind} {decl.name!r} declared in the manifest is not in the model "
                 f"(the model's {kind}s: {sorted(real)})")]
    if decl.dtype != spec.dtype:
        return [f"{kind} {decl.name!r}: the manifest says {decl.dtype}, the model has {spec.dtype}"]
    if not decl.shape:
        return []
    if len(decl.shape) != len(spec.shape):
        return [(f"{kind} {decl.name!r}: the manifest shape {decl.shape} has rank "
                 f"{len(decl.shape)}, the model's {list(spec.shape)} has rank {len(spec.shape)}")]
    for i, (want, have) in enumerate(zip(decl.shape, spec.shape, strict=True)):
        if isinstance(want, int) and want >= 0 and have >= 0 and want != have:
            return [(f"{kind} {decl.name!r}: dim {i} is {want} in the manifest but {have} "
                     f"in the model ({list(spec.shape)})")]
    return []


def check_manifest(manifest: Manifest, inputs: dict[str, Spec], outputs: dict[str, Spec]) -> None:
    """Raise :class:`ModelMismatch` listing every difference found."""
    problems: list[str] = []
    for decl in manifest.model.inputs:
        problems += _check_one("input", decl, inputs)
    for decl in manifest.model.outputs:
        problems += _check_one("output", decl, outputs)
    declared = {t.name for t in manifest.model.inputs}
    for name, spec in inputs.items():
        if name not in declared:
            problems.append(
                f"model input {name!r} ({spec.describe()}) is not declared in the manifest")
    pre, post = manifest.preprocess, manifest.postprocess
    if pre is not None and pre.input is not None and pre.input not in inputs:
        problems.append(f"preprocess.input {pre.input!r} is not a model input")
    if post is not None and post.output is not None and post.output not in outputs:
        problems.append(f"postprocess.output {post.output!r} is not a model output")
    if problems:
        raise ModelMismatch(problems)


def _providers(settings: WorkerSettings) -> list:
    if settings.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UnusableSettings(
            f"CUDAExecutionProvider not available in this onnxruntime build "
            f"({ort.__version__}, providers: {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu or place the app on the CPU card")
    return settings.providers()


def load_app(app_dir: Path, threads: int = 1, spin: bool = False, *,
             settings: WorkerSettings | None = None) -> LoadedApp:
    """Read the manifest, open the model and check one against the other.

    ``settings`` (or, the old way, ``threads`` and ``spin``) say how: intra-op
    threads, inter-op threads, whether intra-op threads busy-wait between runs
    (lower latency for big multi-threaded models, but a core burnt per thread
    while idle, which hurts neighbours) and the execution provider.
    """
    settings = settings or WorkerSettings(threads=threads, spin=spin)
    app_dir = Path(app_dir)
    manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text(encoding="utf-8")))
    for key in manifest.unknown_keys():
        logger.warning("manifest key %s is not known to this node; ignored", key)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, settings.threads)
    opts.inter_op_num_threads = max(1, settings.inter_threads)
    opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if settings.inter_threads > 1
                           else ort.ExecutionMode.ORT_SEQUENTIAL)
    opts.add_session_config_entry(SPIN_KEY, "1" if settings.spin else "0")
    session = ort.InferenceSession(
        str(app_dir / manifest.model.file), sess_options=opts, providers=_providers(settings))
    if settings.provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise UnusableSettings(
            "CUDAExecutionProvider failed to initialise (CUDA/cuDNN libraries or the driver "
            f"missing?); the session fell back to {session.get_providers()}")
    inputs = {n.name: Spec.from_ort(n) for n in session.get_inputs()}
    outputs = {n.name: Spec.from_ort(n) for n in session.get_outputs()}
    check_manifest(manifest, inputs, outputs)
    return LoadedApp(app_dir, manifest, session, inputs, outputs, read_labels(app_dir, manifest),
                     settings)
