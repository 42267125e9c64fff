"""Cards and slices: what the node has, and which app gets which part of it.

Importing this package is cheap (no ONNX Runtime, no NVML until asked).
"""

from .cards import Card, UsageSampler, cuda_runtime_installed, discover_cards
from .placement import Placement, PlacementError, SliceRequest
from .slices import Slice, WorkerSettings, worker_settings

__all__ = [
    "Card",
    "Placement",
    "PlacementError",
    "Slice",
    "SliceRequest",
    "UsageSampler",
    "WorkerSettings",
    "cuda_runtime_installed",
    "discover_cards",
    "worker_settings",
]
