"""Slices made real: worker processes pinned, threaded and budgeted as placed.

Real worker processes, real ONNX Runtime, the real digits model; what is
checked is what the kernel and the worker's own session say is in effect
(``/proc/<pid>/task/*/status``, the worker's ``runtime`` report).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_node.resources import (
    Card,
    Placement,
    SliceRequest,
    WorkerSettings,
    discover_cards,
    worker_settings,
)
from edge_node.worker import WorkerStartError
from edge_node.worker.supervisor import WorkerSupervisor
from tests.models import wait_for, load_test_split, worker_pids

CORES = sorted(os.sched_getaffinity(0))
GPU_SLICE_CARD = Card(id="gpu0", kind="gpu", name="no such gpu", memory_mb=8192, index=0)


@pytest.fixture
def run_dir():
    d = Path(tempfile.mkdtemp(prefix="aidc-r-", dir="/tmp"))  # AF_UNIX paths stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sup(run_dir):
    s = WorkerSupervisor(run_dir, restart_budget=(2, 60.0), memory_poll=0.2)
    yield s
    s.stop_all()
    assert worker_pids(str(run_dir)) == []


def task_affinities(pid: int) -> dict[int, set[int]]:
    """Every thread of ``pid`` -> the CPUs the kernel lets it run on."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        spec = next(ln.split(":", 1)[1].strip() for ln in text.splitlines()
                    if ln.startswith("Cpus_allowed_list"))
        cpus: set[int] = set()
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        out[int(tid)] = cpus
    return out


def thread_runs(pid: int) -> dict[int, tuple[int, int]]:
    """Every thread of ``pid`` -> (CPU ticks used, the CPU it last ran on)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(f[11]) + int(f[12]), int(f[36]))  # utime + stime, processor
    return out


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores to split")
def test_two_apps_on_half_the_cpu_card_each_run_only_on_their_own_cores(sup, app_dir):
    """Two models on half a card each must not steal each other's cores: every
    thread of each worker is confined to its slice, even under load, and both
    still answer correctly."""
    placement = Placement(discover_cards(nvml=None), reserve_mb=0)
    slices = {n: placement.place(SliceRequest(n, 0.5, 512)) for n in ("a", "b")}
    assert not set(slices["a"].cores) & set(slices["b"].cores)
    clients = {n: sup.start(n, app_dir, settings=worker_settings(s)) for n, s in slices.items()}
    pids = {n: sup.status()[n]["pid"] for n in slices}
    for n, s in slices.items():
        runtime = sup.status()[n]["runtime"]
        assert runtime["affinity"] == list(s.cores)
        assert runtime["intra_op_threads"] == len(s.cores) and runtime["inter_op_threads"] == 1
        assert runtime["spin"] is False  # opt-in only: the agent and clients share the cores
        assert clients[n].meta()["runtime"]["affinity"] == list(s.cores)  # the `meta` op too

    x, y = load_test_split(app_dir)
    stop, errors, seen = threading.Event(), [], {n: set() for n in slices}

    def load(name: str) -> None:
        try:
            while not stop.is_set():
                assert (clients[name].infer({"input": x})["label"] == y).mean() > 0.9
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    before = {n: thread_runs(pids[n]) for n in slices}
    threads = [threading.Thread(target=load, args=(n,)) for n in slices for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            time.sleep(0.05)
            for n in slices:  # where the threads that work under load run
                seen[n] |= {cpu for tid, (ticks, cpu) in thread_runs(pids[n]).items()
                            if ticks > before[n].get(tid, (0, 0))[0]}
                assert all(c == set(slices[n].cores)
                           for c in task_affinities(pids[n]).values()), task_affinities(pids[n])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    for n, s in slices.items():
        assert seen[n] and seen[n] <= set(s.cores), f"{n} ran on {seen[n]}, its slice is {s.cores}"


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores for a 2-thread slice")
def test_onnx_runtime_threads_are_the_slices_cores(sup, app_dir):
    """A slice of N cores must run N intra-op threads -- no more (oversubscription
    costs 27-33 % throughput) and no fewer: the worker's session says so and the
    process really has N-1 more OS threads than a 1-thread worker."""
    pools = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    counts = {}
    for n in (1, 2):
        sup.start(f"t{n}", app_dir, settings=WorkerSettings(
            threads=n, cpus=tuple(CORES[:2]), spin=False, env=pools))
        runtime = sup.status()[f"t{n}"]["runtime"]
        assert runtime["intra_op_threads"] == n and runtime["spin"] is False
        assert runtime["providers"] == ["CPUExecutionProvider"]
        counts[n] = thread_count(sup.status()[f"t{n}"]["pid"])
    assert counts[2] - counts[1] == 1, counts


def test_a_worker_over_its_memory_budget_is_restarted_with_the_reason(sup, app_dir):
    """A model that grows past its slice's memory must not starve the node: its
    worker is restarted, the reason is shown, and it counts against the budget."""
    sup.start("hungry", app_dir, settings=WorkerSettings(memory_mb=16))  # the runtime alone > 16
    first = sup.status()["hungry"]["pid"]
    wait_for(lambda: sup.status()["hungry"]["state"] == "failed", what="restart budget used up")
    st = sup.status()["hungry"]
    assert st["restarts"] == 2 and st["memory_restarts"] == 3 and st["pid"] != first
    assert st["last_error"].startswith("memory budget exceeded: ")
    assert st["last_error"].endswith(" MB > 16 MB")
    assert int(st["last_error"].split(": ")[1].split()[0]) > 16


def test_a_worker_within_its_memory_budget_keeps_running(sup, app_dir):
    """The budget check must not kill healthy workers; their memory is reported."""
    client = sup.start("fine", app_dir, settings=WorkerSettings(memory_mb=2048))
    pid = sup.status()["fine"]["pid"]
    wait_for(lambda: sup.status()["fine"]["rss_mb"], what="a memory reading")
    time.sleep(1.0)  # five more readings
    st = sup.status()["fine"]
    assert (st["pid"], st["restarts"], st["memory_restarts"]) == (pid, 0, 0)
    assert 0 < st["rss_mb"] < 2048 and st["memory_budget_mb"] == 2048
    assert client.ping()["pid"] == pid


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has CUDA")
def test_requesting_cuda_on_a_cpu_only_runtime_fails_clearly_and_the_rest_serves(sup, app_dir):
    """An app placed on a GPU the runtime cannot drive fails with a reason the
    operator understands, while the apps already serving keep serving."""
    other = sup.start("cpu-app", app_dir, settings=worker_settings(
        Placement(discover_cards(nvml=None), reserve_mb=0).place(SliceRequest("c", 0.5, 512))))
    gpu_slice = Placement([GPU_SLICE_CARD]).place(SliceRequest("g", 0.5, 1024, card="gpu"))
    with pytest.raises(WorkerStartError) as info:
        sup.start("gpu-app", app_dir, settings=worker_settings(gpu_slice, mps_dir=None))
    assert "CUDAExecutionProvider not available in this onnxruntime build" in info.value.reason
    assert "exited with code 2" in info.value.reason
    assert sup.status()["gpu-app"]["state"] == "failed"
    assert other.infer({"input": np.zeros((1, 64), np.float32)})["probabilities"].shape == (1, 10)


def test_pinning_to_a_core_the_box_lacks_is_a_clear_start_error(sup, app_dir):
    """A slice naming a core that is not there (config from another box) must say so."""
    with pytest.raises(WorkerStartError, match=r"cannot pin to CPUs \[4095\]"):
        sup.start("nowhere", app_dir, settings=WorkerSettings(cpus=(4095,)))
