"""The node's cards: the CPU pseudo-card and, through NVML, NVIDIA GPUs.

:func:`discover_cards` finds them once at start: the CPU card's cores are the
ones this process may run on (``os.sched_getaffinity``), its memory is
``MemTotal`` (capped by the cgroup's ``memory.max`` when one is set); a GPU is
listed when the optional ``nvidia-ml-py`` package (``import pynvml``) is
installed and a driver answers. Without NVML or a driver the node has just the
CPU card, said once at INFO. :class:`UsageSampler` reads what is in use now
(memory, utilisation) for the reported state and ``/metrics``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
_DEFAULT: Any = object()  # "import pynvml yourself"
_said_no_gpu = False


@dataclass(frozen=True)
class Card:
    """One card: ``cpu`` (cores + host memory) or ``gpuN`` (an NVIDIA device)."""

    id: str
    kind: str  # "cpu" | "gpu"
    name: str
    memory_mb: int
    cores: tuple[int, ...] = ()  # cpu: the usable core ids
    index: int | None = None  # gpu: the NVML index (= CUDA ordinal in PCI bus order)
    uuid: str | None = None

    def to_dict(self, usage: dict | None = None) -> dict:
        """JSON-able: identity and capacity, plus ``usage`` (from :class:`UsageSampler`)."""
        d = {k: v for k, v in asdict(self).items() if v not in (None, ())}
        if self.kind == "cpu":
            d["cores"] = list(self.cores)
        return {**d, **(usage or {})}


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in kB (``MemTotal``, ``MemAvailable``, ...)."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    return out


def _cgroup_limit_mb() -> int | None:
    try:
        rel = Path("/proc/self/cgroup").read_text().splitlines()[0].split(":", 2)[2]
        raw = Path("/sys/fs/cgroup", rel.lstrip("/"), "memory.max").read_text().strip()
    except (OSError, IndexError):
        return None
    return None if raw == "max" else int(raw) >> 20


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def cpu_card() -> Card:
    total = meminfo()["MemTotal"] >> 10
    limit = _cgroup_limit_mb()
    return Card(id="cpu", kind="cpu", name=_cpu_name(),
                memory_mb=min(total, limit) if limit else total,
                cores=tuple(sorted(os.sched_getaffinity(0))))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def load_nvml(nvml: Any = _DEFAULT) -> Any:
    """The initialised NVML module, or None (no ``pynvml``, no driver, no GPU)."""
    global _said_no_gpu
    try:
        if nvml is _DEFAULT:
            import pynvml as nvml
        if nvml is None:
            raise ImportError("nvidia-ml-py is not installed")
        nvml.nvmlInit()
        return nvml
    except Exception as err:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded ...
        if not _said_no_gpu:
            _said_no_gpu = True
            logger.info("no NVIDIA GPU (NVML: %s); the node uses its CPU card only", err)
        return None


def gpu_cards(nvml: Any) -> list[Card]:
    cards = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        cards.append(Card(id=f"gpu{i}", kind="gpu", name=_text(nvml.nvmlDeviceGetName(h)),
                          memory_mb=nvml.nvmlDeviceGetMemoryInfo(h).total >> 20, index=i,
                          uuid=_text(nvml.nvmlDeviceGetUUID(h))))
    return cards


def discover_cards(nvml: Any = _DEFAULT, *, quiet: bool = False) -> list[Card]:
    """The CPU card first, then every GPU NVML sees (``nvml`` is the seam for tests).

    ``quiet``: no INFO line per card (the ``accelerator`` health check discovers the
    cards again every few seconds to notice one that is gone)."""
    cards = [cpu_card()]
    lib = load_nvml(nvml)
    if lib is not None:
        try:
            cards += gpu_cards(lib)
        except Exception as err:  # a driver that answers init but not queries
            logger.warning("NVML could not list GPUs (%s); using the CPU card only", err)
    for c in cards if not quiet else ():
        logger.info("card %s: %s, %d MB%s", c.id, c.name, c.memory_mb,
                    f", cores {list(c.cores)}" if c.cores else "")
    return cards


def cuda_runtime_installed() -> bool:
    """True when the installed ONNX Runtime ships the CUDA provider (without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if any(Path(loc, "capi").glob("libonnxruntime_providers_cuda*")):
            return True
    return False


class UsageSampler:
    """What each card uses now; CPU utilisation is averaged since the previous call."""

    def __init__(self, cards: list[Card], nvml: Any = None) -> None:
        self.cards = cards
        self.nvml = nvml
        self._last: dict[int, tuple[int, int]] = {}

    def _cpu_util(self, cores: tuple[int, ...]) -> float | None:
        busy = total = 0
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu") or line[3] == " ":
                    continue
                name, *vals = line.split()
                core = int(name[3:])
                if core not in cores:
                    continue
                ticks = [int(v) for v in vals]
                idle, all_ = ticks[3] + ticks[4], sum(ticks[:8])
                prev_idle, prev_all = self._last.get(core, (0, 0))
                self._last[core] = (idle, all_)
                busy += (all_ - prev_all) - (idle - prev_idle)
                total += all_ - prev_all
        return round(100.0 * busy / total, 1) if total > 0 else None

    def sample(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for c in self.cards:
            try:
                if c.kind == "cpu":
                    free = meminfo()["MemAvailable"] >> 10
                    out[c.id] = {"memory_used_mb": max(0, c.memory_mb - free),
                                 "utilization_pct": self._cpu_util(c.cores)}
                elif self.nvml is not None:
                    h = self.nvml.nvmlDeviceGetHandleByIndex(c.index)
                    out[c.id] = {
                        "memory_used_mb": self.nvml.nvmlDeviceGetMemoryInfo(h).used >> 20,
                        "utilization_pct": float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                    }
            except Exception as err:  # a card that stops answering must not stop the report
                logger.debug("cannot read usage of %s: %s", c.id, err)
                out[c.id] = {"error": str(err)}
        return out
