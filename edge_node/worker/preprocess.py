"""Image bytes -> model input tensor, as the manifest's ``preprocess`` says.

Order: decode (cv2.imdecode; ``gray`` decodes to one channel, ``rgb``/``bgr`` to
three in that order) -> resize to ``(h, w)`` (``resize``, or the model's fixed
spatial dims when ``resize`` is unset) -> optional ``invert`` (255 - pixel) ->
``* scale`` -> ``(x - mean) / std`` per channel -> layout (``NCHW``, ``NHWC``
or ``flat``, the HWC pixels flattened) with a batch dim of 1 -> the input's dtype
(integer inputs are rounded and clipped).
"""

from __future__ import annotations

import cv2
import numpy as np

from cloud_sync.manifest import Preprocess, TensorSpec

from .errors import BadInput


def decode_image(image_bytes: bytes, color: str) -> np.ndarray:
    """Decode to HxW (gray) or HxWx3 in ``color`` order; :class:`BadInput` if unreadable."""
    if not image_bytes:
        raise BadInput("empty image: the request carried no image bytes")
    flag = cv2.IMREAD_GRAYSCALE if color == "gray" else cv2.IMREAD_COLOR
    try:
        img = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), flag)
    except cv2.error as err:
        raise BadInput(f"unreadable image: {err}") from err
    if img is None or img.size == 0:
        raise BadInput(
            f"unreadable image ({len(image_bytes)} bytes): not a PNG, JPEG, BMP, TIFF "
            "or WebP file, or it is truncated/corrupt"
        )
    if color == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def _spec_hw(layout: str, shape: list) -> tuple[int, int] | None:
    dims = {"NCHW": (2, 3), "NHWC": (1, 2)}.get(layout)
    if dims is None or len(shape) != 4:
        return None
    h, w = shape[dims[0]], shape[dims[1]]
    return (h, w) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None


def _per_channel(values: list[float], channels: int, what: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise ValueError(f"preprocess.{what} has {len(values)} values for {channels} channel(s)")
    return np.asarray(values, np.float32)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind in "iub":
        info = np.iinfo(dt) if dt.kind != "b" else None
        x = np.rint(x)
        if info is not None:
            x = np.clip(x, info.min, info.max)
    return np.ascontiguousarray(x, dtype=dt)


def image_to_tensor(image_bytes: bytes, pre: Preprocess, input_spec: TensorSpec) -> np.ndarray:
    """The tensor to feed ``input_spec`` for one encoded image (batch of 1)."""
    if input_spec.dtype == "string":
        raise ValueError(f"input {input_spec.name!r} is a string tensor; images cannot feed it")
    return _to_tensor(decode_image(image_bytes, pre.color), pre, input_spec)


def pixels_to_tensor(frame: np.ndarray, pre: Preprocess, input_spec: TensorSpec) -> np.ndarray:
    """The tensor for one BGR (HxWx3) or grey (HxW, HxWx1) uint8 frame, as
    :func:`image_to_tensor` makes it for the same pixels sent as an image.

    ``frame`` may be a view of shared memory: it is only read, and the tensor
    returned never shares memory with it.
    """
    if input_spec.dtype == "string":
        raise ValueError(f"input {input_spec.name!r} is a string tensor; images cannot feed it")
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or frame.size == 0:
        raise BadInput(f"a frame is HxW or HxWxC uint8 pixels, not {frame.dtype} {frame.shape}")
    grey = frame.ndim == 2 or frame.shape[2] == 1
    if not grey and frame.shape[2] != 3:
        raise BadInput(f"a frame has 1 or 3 channels, not {frame.shape[2]}")
    if grey:
        frame = frame.reshape(frame.shape[:2])
        img = frame if pre.color == "gray" else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    elif pre.color == "gray":
        img = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    elif pre.color == "rgb":
        img = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    else:
        img = frame
    return _to_tensor(img, pre, input_spec)


def _to_tensor(img: np.ndarray, pre: Preprocess, input_spec: TensorSpec) -> np.ndarray:
    size = pre.resize or _spec_hw(pre.layout, input_spec.shape)
    if size is not None and tuple(img.shape[:2]) != tuple(size):
        h, w = int(size[0]), int(size[1])
        shrink = h * w < img.shape[0] * img.shape[1]
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if img.ndim == 2:
        img = img[:, :, None]
    x = img.astype(np.float32)  # always a new array (``img`` may be shared memory)
    if pre.invert:
        x = 255.0 - x
    if pre.scale != 1.0:
        x *= np.float32(pre.scale)
    channels = x.shape[2]
    mean = _per_channel(pre.mean, channels, "mean")
    std = _per_channel(pre.std, channels, "std")
    if np.any(std == 0):
        raise ValueError("preprocess.std must not contain 0")
    if np.any(mean != 0) or np.any(std != 1):
        x = (x - mean) / std
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    x = x.reshape(1, -1) if pre.layout == "flat" else x[None]
    return _cast(x, input_spec.dtype)


def tensor_to_png(arr: np.ndarray, pre: Preprocess) -> bytes:
    """Best-effort inverse of :func:`image_to_tensor` (batch item 0), for previews."""
    x = np.asarray(arr, np.float32)
    if pre.layout == "flat":
        if pre.resize is None:
            raise ValueError("a flat tensor needs preprocess.resize to be shown as an image")
        h, w = pre.resize
        x = x.reshape(-1)[: (x.size // (h * w)) * h * w].reshape(h, w, -1)[:, :, :3]
    else:
        x = x[0] if x.ndim == 4 else x
        x = x.transpose(1, 2, 0) if pre.layout == "NCHW" else x
    channels = x.shape[2]
    x = x * _per_channel(pre.std, channels, "std") + _per_channel(pre.mean, channels, "mean")
    x = x / pre.scale if pre.scale else x
    if pre.invert:
        x = 255.0 - x
    img = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if channels == 3 and pre.color == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img if channels == 3 else img[:, :, 0])
    if not ok:
        raise ValueError("could not encode the tensor as PNG")
    return buf.tobytes()
