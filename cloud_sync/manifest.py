"""The app manifest: what a model needs and how to use it.

Lenient with third-party manifests (unknown keys are kept and reported as
warnings, older ``schema_version`` values are migrated), strict about what we
rely on (name, semver, tensors, processing options).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PackageError

SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
MANIFEST_SCHEMA_VERSION = 1

#: ONNX element type names we accept in tensor specs (numpy dtype names).
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool", "string")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TensorSpec(_Lenient):
    name: str = Field(min_length=1)
    dtype: str = "float32"
    #: dims: int for fixed, str/None for symbolic (batch)
    shape: list[int | str | None] = Field(default_factory=list)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unsupported dtype {v!r}; one of {', '.join(DTYPES)}")
        return v


class ModelSpec(_Lenient):
    file: str = "model.onnx"
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)


class Preprocess(_Lenient):
    """How an image becomes the model's input tensor."""

    input: str | None = Field(default=None, description="input tensor; default the first")
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    resize: tuple[int, int] | None = Field(default=None, description="(height, width)")
    layout: Literal["NCHW", "NHWC", "flat"] = "NCHW"
    scale: float = Field(default=1.0 / 255.0, description="pixel * scale, before mean/std")
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    invert: bool = Field(default=False, description="255 - pixel (dark ink on light paper)")


class Postprocess(_Lenient):
    """How the output tensor becomes an answer."""

    output: str | None = Field(default=None, description="output tensor; default the first")
    softmax: bool = Field(default=False, description="apply softmax to the scores")
    top_k: int = Field(default=5, ge=1, le=1000)
    labels_file: str | None = "labels.txt"


class Resources(_Lenient):
    card_fraction: float = Field(default=0.5, gt=0, le=1)
    memory_mb: int = Field(default=256, ge=16)


class Batching(_Lenient):
    """Dynamic batching of infer requests (edge_node/serving/batching.py). The
    model's inputs and outputs must take the batch as their first dimension."""

    max_batch: int = Field(default=1, ge=1, le=1024, description="1: never batch")
    max_delay_ms: float = Field(default=2.0, ge=0, le=1000)
    max_in_flight: int = Field(default=1, ge=1, le=64)
    cpu: bool = Field(default=False, description="batch on CPU slices too (GPU: always)")


class HardExamplePolicy(_Lenient):
    """Which results are kept for labelling (edge_node/hardex.py)."""

    policy: Literal["confidence", "margin", "entropy", "box", "none"] = "confidence"
    threshold: float = Field(default=0.6, ge=0)
    #: box policy: a detection whose score is in [box_low, threshold) is doubtful
    box_low: float = Field(default=0.3, ge=0, le=1)


class PromotionGate(_Lenient):
    """When a model fine-tuned on site may replace the served one (docs/learning.md)."""

    #: the candidate must beat the served model on the site's held-out samples by this
    #: much (accuracy, 0..1)
    min_gain: float = Field(default=0.02, ge=0, le=1)
    #: and may lose at most this much on the replay set (the base distribution)
    max_regression: float = Field(default=0.02, ge=0, le=1)
    #: held-out labelled samples needed before any verdict
    min_heldout: int = Field(default=10, ge=1)
    #: labelled training samples needed to start a fine-tune
    min_samples: int = Field(default=20, ge=1)
    #: live requests compared in shadow mode before the switch (0: no shadow)
    shadow_requests: int = Field(default=50, ge=0)
    #: the shadow candidate must agree with the served model at least this often on
    #: live requests where the served model was sure (score >= 0.9): a check against a
    #: broken candidate, not an accuracy judge -- on a shifted site the served model is
    #: often sure and wrong (measured: sure on 35 % of blurred digits, right on 75 % of
    #: those), which is what the fine-tune fixes; accuracy is the gate's job
    shadow_min_agreement: float = Field(default=0.5, ge=0, le=1)
    #: the shadow ends after this long even with fewer requests; with none at all
    #: (a camera-only app: stream frames are not copied to the shadow) the gate's
    #: verdict stands alone and the run's reason says so
    shadow_timeout_s: float = Field(default=600.0, gt=0)


class Learning(_Lenient):
    head: str | None = Field(default=None, description="the fine-tunable head node")
    hard_examples: HardExamplePolicy = Field(default_factory=HardExamplePolicy)
    #: a file in the package with a replay set from the base distribution (an .npz
    #: with X, the model's input tensors, and y, class indices): mixed into every
    #: fine-tune and used by the promotion gate to catch forgetting
    replay: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    gate: PromotionGate = Field(default_factory=PromotionGate)


class Manifest(_Lenient):
    schema_version: int = MANIFEST_SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    version: str
    task: Literal["classification", "detection", "embedding", "generic"] = "generic"
    description: str = ""
    publisher: str = ""
    model: ModelSpec
    preprocess: Preprocess | None = None
    postprocess: Postprocess | None = None
    resources: Resources = Field(default_factory=Resources)
    batching: Batching = Field(default_factory=Batching)
    learning: Learning = Field(default_factory=Learning)

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not SEMVER_RE.match(v):
            raise ValueError(f"version {v!r} is not semver (MAJOR.MINOR.PATCH)")
        return v

    def unknown_keys(self) -> list[str]:
        """Dotted paths of keys we do not know (kept, reported as warnings)."""
        out: list[str] = []

        def walk(m: BaseModel, path: str) -> None:
            for k in (m.model_extra or {}):
                out.append(f"{path}{k}")
            for name in type(m).model_fields:
                val = getattr(m, name)
                if isinstance(val, BaseModel):
                    walk(val, f"{path}{name}.")
                elif isinstance(val, list):
                    for i, item in enumerate(val):
                        if isinstance(item, BaseModel):
                            walk(item, f"{path}{name}[{i}].")

        walk(self, "")
        return out


def migrate(raw: dict) -> dict:
    """Bring an older manifest dict to the current schema (none older exist yet)."""
    raw = dict(raw)
    raw.setdefault("schema_version", MANIFEST_SCHEMA_VERSION)
    if raw["schema_version"] > MANIFEST_SCHEMA_VERSION:
        raise PackageError(
            "bad_manifest",
            f"schema_version {raw['schema_version']} is newer than this software "
            f"({MANIFEST_SCHEMA_VERSION}); upgrade the node",
        )
    return raw


def load_manifest(raw: dict) -> Manifest:
    """Validate a manifest dict; :class:`PackageError` (``bad_manifest``) says where."""
    if not isinstance(raw, dict):
        raise PackageError("bad_manifest", "manifest.json is not a JSON object")
    try:
        return Manifest.model_validate(migrate(raw))
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise PackageError("bad_manifest", f"{loc}: {first.get('msg')}") from err
