"""Cards, placement and slice settings: what the node has and who gets which part.

Placement runs on cards built here (a 2-core CPU card, fake GPUs) so every
number in a message is known; card discovery runs on this real machine. NVML
and CUDA cannot be real in CI (no GPU): those tests replace NVML with a fake
module at the one seam, :func:`discover_cards`'s ``nvml`` argument, and say so.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from types import SimpleNamespace

import pytest

from cloud_sync.manifest import Resources
from edge_node.errors import EdgeError
from edge_node.resources import (
    Card,
    Placement,
    PlacementError,
    SliceRequest,
    UsageSampler,
    WorkerSettings,
    discover_cards,
    worker_settings,
)
from edge_node.resources import cards as cards_mod
from edge_node.resources.slices import from_args, mps_pipe_dir
from edge_node.worker.process import parse_args

CPU2 = Card(id="cpu", kind="cpu", name="test cpu", memory_mb=2048, cores=(0, 1))
GPU0 = Card(id="gpu0", kind="gpu", name="test gpu", memory_mb=8192, index=0, uuid="GPU-0")


def req(app: str, fraction: float, memory_mb: int = 256, card: str | None = None):
    return SliceRequest(app=app, fraction=fraction, memory_mb=memory_mb, card=card)


# --- cards -------------------------------------------------------------------


def test_cpu_card_is_the_cores_and_memory_this_node_may_use():
    """The operator sees the cores the agent may really use (systemd/cgroup pinning
    included) and the box's memory, in a form the reported state can carry."""
    cards = discover_cards(nvml=None)
    cpu = cards[0]
    assert cpu.id == "cpu" and cpu.kind == "cpu"
    assert list(cpu.cores) == sorted(os.sched_getaffinity(0))
    total_mb = cards_mod.meminfo()["MemTotal"] >> 10
    assert 0 < cpu.memory_mb <= total_mb
    d = json.loads(json.dumps(cpu.to_dict()))
    assert d["cores"] == list(cpu.cores) and d["memory_mb"] == cpu.memory_mb
    usage = UsageSampler(cards).sample()["cpu"]
    assert 0 < usage["memory_used_mb"] <= cpu.memory_mb
    assert usage["utilization_pct"] is None or 0 <= usage["utilization_pct"] <= 100


def test_without_nvml_the_node_has_its_cpu_card_only_and_says_so_once(monkeypatch, caplog):
    """A CPU-only box (no nvidia-ml-py, or no driver) must come up serving on its
    CPU, with one INFO line saying why there is no GPU -- not a crash, not spam."""
    monkeypatch.setattr(cards_mod, "_said_no_gpu", False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError

    class NoDriver:
        @staticmethod
        def nvmlInit():
            raise RuntimeError("NVML Shared Library Not Found")

    with caplog.at_level(logging.INFO, logger="edge_node.resources.cards"):
        assert [c.id for c in discover_cards()] == ["cpu"]
        assert [c.id for c in discover_cards(nvml=NoDriver)] == ["cpu"]
    said = [r for r in caplog.records if "no NVIDIA GPU" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "nvidia-ml-py is not installed" in said[0].getMessage() or \
        "pynvml" in said[0].getMessage()


class FakeNvml:
    """Stands in for ``pynvml`` (the seam: no GPU or driver exists in CI)."""

    def __init__(self, gpus: list[tuple[str, int, int, int]]) -> None:
        self.gpus = gpus  # (name, total MB, used MB, utilisation %)
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.gpus[h][0].encode()  # older nvidia-ml-py returns bytes

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h:04d}"

    def nvmlDeviceGetMemoryInfo(self, h):
        _, total, used, _ = self.gpus[h]
        return SimpleNamespace(total=total << 20, used=used << 20, free=(total - used) << 20)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.gpus[h][3], memory=0)


def test_gpus_are_found_through_nvml_with_name_uuid_memory_and_utilisation():
    """Seam test (no GPU in CI; NVML is faked): every GPU NVML lists becomes a card
    the operator can see, with live memory use and utilisation for /metrics."""
    nvml = FakeNvml([("NVIDIA A2", 15360, 1200, 37), ("NVIDIA T4", 15360, 0, 0)])
    cards = discover_cards(nvml=nvml)
    assert [c.id for c in cards] == ["cpu", "gpu0", "gpu1"]
    gpu0 = cards[1]
    assert (gpu0.kind, gpu0.name, gpu0.uuid, gpu0.memory_mb, gpu0.index) == (
        "gpu", "NVIDIA A2", "GPU-0000", 15360, 0)
    usage = UsageSampler(cards, nvml).sample()
    assert usage["gpu0"] == {"memory_used_mb": 1200, "utilization_pct": 37.0}
    assert json.loads(json.dumps(gpu0.to_dict(usage["gpu0"])))["utilization_pct"] == 37.0


# --- placement on the CPU card -----------------------------------------------


def test_two_apps_on_half_the_cpu_card_get_disjoint_dedicated_cores():
    """Two apps at 0.5 each must never compete for a core: each gets its own."""
    p = Placement([CPU2], reserve_mb=512)
    a, b = p.place(req("a", 0.5)), p.place(req("b", 0.5))
    assert a.cores == (0,) and b.cores == (1,)
    assert not a.shared and not b.shared and a.note == ""
    snap = p.snapshot()["cpu"]
    assert [s["app"] for s in snap["slices"]] == ["a", "b"]
    assert snap["free"] == {"memory_mb": 2048 - 512 - 512, "cores": [], "core_shares": {}}


def test_a_fraction_rounds_up_to_whole_cores_and_says_what_it_reserved():
    """0.25 of a 2-core card is half a core; a dedicated slice is a whole core, and
    the operator is told the app holds 0.5 of the card, not 0.25."""
    s = Placement([CPU2]).place(req("small", 0.25))
    assert s.cores == (0,)
    assert "asked for 0.25 of 2 cores (0.5)" in s.note
    assert "reserved 1 core (0.5 of the card)" in s.note


def test_refusal_names_what_does_not_fit_and_what_is_free():
    """An app asking for more than is left gets an error the operator can act on,
    and the apps already placed keep their slices."""
    p = Placement([CPU2], reserve_mb=148)  # 1900 MB for apps
    p.place(req("first", 0.5, 1000))
    with pytest.raises(PlacementError) as info:
        p.place(req("digits", 1.0, 512))
    assert str(info.value) == (
        "digits needs 2 cores and 512 MB on cpu; free: 1 core (core 1), 900 MB")
    assert isinstance(info.value, EdgeError) and info.value.app == "digits"
    with pytest.raises(PlacementError, match="needs 1 core and 901 MB on cpu; free: 1 core"):
        p.place(req("fat", 0.5, 901))
    assert p.get("digits") is None and p.get("first").cores == (0,)


def test_release_gives_the_cores_and_memory_back():
    """Removing an app must free its slice for the next app."""
    p = Placement([CPU2], reserve_mb=0)
    p.place(req("a", 1.0, 2048))
    with pytest.raises(PlacementError):
        p.place(req("b", 0.5))
    p.release("a")
    p.release("never-placed")  # harmless
    assert p.place(req("b", 1.0, 2048)).cores == (0, 1)


def test_placing_an_app_again_reuses_or_resizes_its_slice():
    """An upgrade places the same app again: it keeps its slice; a bigger request
    grows it when there is room, and a too-big one leaves the old slice intact."""
    p = Placement([CPU2], reserve_mb=0)
    first = p.place(req("a", 0.5))
    assert p.place(req("a", 0.5)) is first
    grown = p.place(req("a", 1.0))
    assert grown.cores == (0, 1)
    p.place(req("a", 0.5))
    p.place(req("b", 0.5))
    with pytest.raises(PlacementError, match=r"current slice on cpu is kept"):
        p.place(req("a", 1.0))
    assert p.get("a").cores == (0,) and p.get("b").cores == (1,)


def test_operator_override_replaces_the_manifest_request():
    """An operator can give an app more (or less) than its publisher asked for on
    this node; a typo in the override is an error, not silently ignored."""
    r = SliceRequest.from_manifest("a", Resources(card_fraction=0.5, memory_mb=256),
                                   {"memory_mb": 700, "card": "cpu"})
    assert (r.fraction, r.memory_mb, r.card) == (0.5, 700, "cpu")
    assert SliceRequest.from_manifest("a", {"card_fraction": 1.0, "memory_mb": 64}).fraction == 1.0
    with pytest.raises(PlacementError, match="unknown resource override keys"):
        SliceRequest.from_manifest("a", Resources(), {"memory": 700})
    with pytest.raises(PlacementError, match=r"card_fraction 1.5 is not in \(0, 1\]"):
        SliceRequest.from_manifest("a", Resources(), {"card_fraction": 1.5})
    with pytest.raises(PlacementError, match="bad resource request"):
        SliceRequest.from_manifest("a", Resources(), {"memory_mb": "lots"})


def test_shared_cores_fit_four_small_apps_on_two_cores():
    """With core sharing on, four quarter-card apps run on a 2-core box, two per
    core, spinning off; a fifth is refused with the shares that are left."""
    p = Placement([CPU2], reserve_mb=0, share_cores=True)
    slices = [p.place(req(n, 0.25, 100)) for n in "abcd"]
    assert [(s.cores, s.core_share, s.shared) for s in slices] == [
        ((0,), 0.5, True), ((0,), 0.5, True), ((1,), 0.5, True), ((1,), 0.5, True)]
    with pytest.raises(PlacementError, match="needs 0.5 of a core and 100 MB on cpu; free: 0 c"):
        p.place(req("e", 0.25, 100))
    p.release("a")
    with pytest.raises(PlacementError, match=r"free: 0 cores, 0.5 of core 0, "):
        p.place(req("whole", 0.5, 100))  # a whole core is not there, half of one is
    assert p.place(req("e", 0.25, 100)).cores == (0,)
    settings = worker_settings(slices[1])
    assert settings.threads == 1 and settings.spin is False and settings.cpus == (0,)


def test_unknown_card_preference_lists_the_cards_there_are():
    """Asking for a GPU on a CPU-only node says which cards the node has."""
    with pytest.raises(PlacementError, match=r"asks for card 'gpu'; this node has: cpu"):
        Placement([CPU2]).place(req("a", 0.5, card="gpu"))


def test_a_gpu_onnx_runtime_cannot_drive_gets_no_apps_by_default(monkeypatch):
    """On a GPU box whose ONNX Runtime is the CPU build, apps must land on the CPU
    (and serve) rather than on a GPU where every worker would fail to start."""
    monkeypatch.setattr("edge_node.resources.placement.cuda_runtime_installed", lambda: False)
    assert Placement([CPU2, GPU0]).place(req("a", 0.5)).card == "cpu"
    monkeypatch.setattr("edge_node.resources.placement.cuda_runtime_installed", lambda: True)
    assert Placement([CPU2, GPU0]).place(req("a", 0.5)).card == "gpu0"


# --- placement on a GPU --------------------------------------------------------


def test_gpu_slices_are_a_compute_share_and_memory_including_the_cuda_context():
    """Seam test (no GPU in CI; the card is built here): apps go to the GPU first,
    each holding a compute share and its memory plus a CUDA context; what does not
    fit anywhere is refused with what each card has free."""
    p = Placement([CPU2, GPU0], reserve_mb=0, gpu_context_mb=300, prefer=("gpu", "cpu"))
    a = p.place(req("a", 0.5, 2000))
    assert (a.card, a.compute_pct, a.device_index, a.memory_mb) == ("gpu0", 50, 0, 2000)
    b = p.place(req("b", 0.3, 3000))
    assert (b.card, b.compute_pct) == ("gpu0", 30)
    assert p.snapshot()["gpu0"]["free"] == {"memory_mb": 8192 - 2300 - 3300, "compute_pct": 20}
    c = p.place(req("c", 0.5, 256))  # 50 % compute is not left: falls to the CPU
    assert c.card == "cpu" and c.cores == (0,)
    with pytest.raises(PlacementError) as info:
        p.place(req("d", 0.6, 4000))
    msg = str(info.value)
    assert "gpu0 needs 60% compute and 4300 MB" in msg and "free: 20% compute, 2592 MB" in msg
    assert "cpu needs 2 cores and 4000 MB, free: 1 core (core 1), 1792 MB" in msg
    assert p.place(req("e", 0.5, 256, card="cpu")).card == "cpu"


def test_gpu_slice_becomes_cuda_provider_options_and_an_mps_share(tmp_path):
    """Seam test (no GPU in CI): a GPU slice must reach ONNX Runtime as the CUDA
    provider on the right device with its memory limit, and MPS as its compute
    share -- but only when an MPS control daemon runs."""
    s = Placement([GPU0], gpu_context_mb=300).place(req("a", 0.25, 1024, card="gpu"))
    no_mps = worker_settings(s, mps_dir=None)
    assert no_mps.providers() == [
        ("CUDAExecutionProvider", {"device_id": 0, "gpu_mem_limit": 1024 << 20,
                                   "arena_extend_strategy": "kSameAsRequested"}),
        "CPUExecutionProvider"]
    assert no_mps.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert no_mps.memory_mb is None and no_mps.cpus is None
    assert no_mps.argv()[-6:] == ["--provider", "cuda", "--device-id", "0", "--gpu-mem-mb", "1024"]
    pipes = tmp_path / "mps"
    pipes.mkdir()
    assert mps_pipe_dir({"CUDA_MPS_PIPE_DIRECTORY": str(pipes)}) is None  # no daemon yet
    (pipes / "control").touch()
    assert mps_pipe_dir({"CUDA_MPS_PIPE_DIRECTORY": str(pipes)}) == pipes
    mps = worker_settings(s, mps_dir=pipes)
    assert mps.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert mps.env["CUDA_MPS_PIPE_DIRECTORY"] == str(pipes)


# --- settings to the worker ----------------------------------------------------


def test_cpu_slice_settings_reach_the_worker_unchanged_through_its_flags():
    """What the agent decides is what the worker parses: one definition for both."""
    s = Placement([CPU2], reserve_mb=0).place(req("a", 1.0, 300))
    settings = worker_settings(s, spin=True)
    assert (settings.threads, settings.cpus, settings.spin, settings.memory_mb) == (
        2, (0, 1), True, 300)
    assert worker_settings(s).spin is False  # spinning is opt-in
    args = parse_args(["--app-dir", "x", "--socket", "y", *settings.argv()])
    back = from_args(args, environ={})
    assert back == WorkerSettings(threads=2, cpus=(0, 1), spin=True)
    old = from_args(parse_args(["--app-dir", "x", "--socket", "y", "--threads", "3"]),
                    environ={"AIDC_ORT_SPIN": "1"})  # the old command line still works
    assert (old.threads, old.cpus, old.spin, old.provider) == (3, None, True, "cpu")
