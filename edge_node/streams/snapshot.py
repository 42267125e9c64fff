"""A camera frame kept as a PNG (a hard example, an alarm's evidence), marked as a frame.

:func:`frame_png` encodes the frame's BGR (or grey) uint8 pixels losslessly, so
the PNG decodes to exactly the pixels the model saw, and adds a ``tEXt`` chunk
(``aidc`` = ``camera-frame``) right after the header. Everything that reads a
PNG ignores the chunk (the labelling page, the cloud); the fine-tune job looks
for it (:func:`is_frame_png`) to turn the frame into the model's input the way
the worker did for the live frame (``pixels_to_tensor``, not an image decode
whose grey conversion rounds differently).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = 8 + 4 + 4 + 13 + 4  # signature, then IHDR: length, type, 13 bytes, crc


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


#: the marker chunk, always written at the same place
MARK = _chunk(b"tEXt", b"aidc\x00camera-frame")


def frame_png(pixels: np.ndarray) -> bytes:
    """HxW or HxWx3 (BGR) uint8 pixels as a marked PNG; ValueError if it cannot be."""
    import cv2  # lazily: only a kept frame loads OpenCV into the agent

    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or pixels.size == 0 or (
            pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
        raise ValueError(f"not a frame: {pixels.dtype} {list(pixels.shape)}")
    ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("OpenCV could not encode the frame as PNG")
    png = buf.tobytes()
    return png[:_IHDR_END] + MARK + png[_IHDR_END:]


def is_frame_png(data: bytes) -> bool:
    """Whether ``data`` is a PNG :func:`frame_png` made (a camera frame)."""
    return data.startswith(PNG_SIGNATURE) and data[_IHDR_END:_IHDR_END + len(MARK)] == MARK
