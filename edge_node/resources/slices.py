"""A slice of a card, and the worker settings that make it real.

:class:`Slice` is what :class:`~edge_node.resources.placement.Placement` hands
out. :func:`worker_settings` turns it into :class:`WorkerSettings`:

* CPU: the worker's CPU affinity (the slice's cores; numpy's and OpenMP's
  pools sized to match), ONNX Runtime
  ``intra_op_num_threads`` = its number of cores, ``inter_op_num_threads`` = 1,
  and ``session.intra_op.allow_spinning`` off unless asked for (``spin=True``)
  and the cores are the slice's own: the agent's HTTP front and clients run
  on the same cores, and a spinning pool starved them on a 2-core box
  (MobileNetV2 HTTP p50 27.6 ms vs 16.5 ms, docs/benchmarks.md);
* GPU: ``CUDAExecutionProvider`` with ``device_id`` and ``gpu_mem_limit`` (then
  CPU for the nodes CUDA lacks), ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so the CUDA
  ordinal is NVML's index, and ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` = the
  compute share when an MPS control daemon runs.

The settings travel to the worker as command-line flags (:meth:`WorkerSettings.argv`,
read back by :func:`from_args`), so both sides share one definition. The host
memory budget (``memory_mb``) is not a flag: the supervisor enforces it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

MPS_DEFAULT_PIPE_DIR = Path("/tmp/nvidia-mps")
_DETECT = object()


@dataclass(frozen=True)
class Slice:
    app: str
    card: str  # card id
    kind: str  # "cpu" | "gpu"
    fraction: float  # what was asked for
    memory_mb: int
    cores: tuple[int, ...] = ()  # cpu: dedicated cores (or the one shared core)
    core_share: float | None = None  # cpu, shared: the part of ``cores[0]`` it may use
    shared: bool = False  # cpu: its core is shared with other slices
    device_index: int | None = None  # gpu
    compute_pct: int | None = None  # gpu: the MPS compute share
    note: str = ""

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if v not in (None, "", ())}

    def describe(self) -> str:
        if self.kind == "cpu":
            where = (f"{self.core_share:g} of core {self.cores[0]}" if self.shared else
                     f"cores {', '.join(map(str, self.cores))}")
        else:
            where = f"{self.compute_pct}% of gpu {self.device_index}"
        return f"{where}, {self.memory_mb} MB" + (f" ({self.note})" if self.note else "")


def cuda_provider_options(device_id: int, gpu_mem_mb: int | None) -> dict:
    """Options of ONNX Runtime's ``CUDAExecutionProvider`` for one slice."""
    opts: dict = {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}
    if gpu_mem_mb:
        opts["gpu_mem_limit"] = gpu_mem_mb << 20
    return opts


@dataclass(frozen=True)
class WorkerSettings:
    threads: int = 1  # ORT intra-op threads
    inter_threads: int = 1
    cpus: tuple[int, ...] | None = None  # CPU affinity; None: inherit
    spin: bool | None = None  # None: the worker's default (AIDC_ORT_SPIN, else off)
    provider: str = "cpu"  # "cpu" | "cuda"
    device_id: int = 0
    gpu_mem_mb: int | None = None
    memory_mb: int | None = None  # host memory budget, enforced by the supervisor
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        """The worker flags (``python -m edge_node.worker ... <these>``)."""
        out = ["--threads", str(self.threads), "--inter-threads", str(self.inter_threads)]
        if self.cpus:
            out += ["--cpus", ",".join(map(str, self.cpus))]
        if self.spin is not None:
            out += ["--spin", "1" if self.spin else "0"]
        if self.provider != "cpu":
            out += ["--provider", self.provider, "--device-id", str(self.device_id)]
            if self.gpu_mem_mb:
                out += ["--gpu-mem-mb", str(self.gpu_mem_mb)]
        return out

    def providers(self) -> list:
        """The ``providers`` argument of ``onnxruntime.InferenceSession``."""
        if self.provider == "cuda":
            return [("CUDAExecutionProvider",
                     cuda_provider_options(self.device_id, self.gpu_mem_mb)),
                    "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cpus"] = list(self.cpus) if self.cpus else None
        d["env"] = dict(self.env)
        return d


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--inter-threads", type=int, default=1, help="ONNX Runtime inter-op threads")
    p.add_argument("--cpus", default=None, help="pin to these CPUs, e.g. 0,1")
    p.add_argument("--spin", choices=("0", "1"), default=None,
                   help="let intra-op threads busy-wait (default: $AIDC_ORT_SPIN, else 0)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--device-id", type=int, default=0, help="CUDA device (with --provider cuda)")
    p.add_argument("--gpu-mem-mb", type=int, default=None, help="CUDA arena limit in MB")


def from_args(a: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> WorkerSettings:
    spin = a.spin == "1" if a.spin is not None else environ.get("AIDC_ORT_SPIN") == "1"
    cpus = tuple(int(c) for c in a.cpus.split(",") if c.strip()) if a.cpus else None
    return WorkerSettings(threads=max(1, a.threads), inter_threads=max(1, a.inter_threads),
                          cpus=cpus, spin=spin, provider=a.provider, device_id=a.device_id,
                          gpu_mem_mb=a.gpu_mem_mb)


def mps_pipe_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The pipe directory of a running MPS control daemon, or None."""
    for d in (environ.get("CUDA_MPS_PIPE_DIRECTORY"), MPS_DEFAULT_PIPE_DIR):
        if d and Path(d, "control").exists():
            return Path(d)
    return None


def worker_settings(s: Slice, *, spin: bool = False,
                    mps_dir: Path | None | object = _DETECT) -> WorkerSettings:
    """The settings that make slice ``s`` real in its worker (``mps_dir``: test seam)."""
    if s.kind == "cpu":
        threads = 1 if s.shared else len(s.cores)
        # numpy's BLAS and OpenMP pools would otherwise start one thread per core of the box
        pools = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
        return WorkerSettings(threads=threads, cpus=tuple(s.cores), spin=spin and not s.shared,
                              memory_mb=s.memory_mb, env=pools)
    mps = mps_pipe_dir() if mps_dir is _DETECT else mps_dir
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if mps is not None and s.compute_pct is not None:
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(mps)
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(s.compute_pct)
    return WorkerSettings(threads=1, spin=False, provider="cuda", device_id=s.device_index or 0,
                          gpu_mem_mb=s.memory_mb, env=env)
