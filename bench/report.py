"""Markdown tables of a reference run (bench/run_all.py), and the machine line."""

from __future__ import annotations

import platform
import time

import numpy as np

from refs import CORES, Measured


def machine() -> dict:
    import onnxruntime
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    mem_kb = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
    return {"cpu": cpu, "cores": len(CORES), "memory_gb": round(mem_kb / 2**20, 1),
            "virtual": " hypervisor" in flags, "avx512": " avx512f" in flags,
            "kernel": platform.release(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d")}


def machine_line(m: dict) -> str:
    virt = ", virtual machine (KVM guest)" if m["virtual"] else ""
    return (f"Machine: {m['cpu']} (x86_64, AVX2{', AVX-512' if m['avx512'] else ''}), "
            f"{m['cores']} cores{virt}, {m['memory_gb']:g} GB, Linux {m['kernel']} (shared, "
            f"noisy), Python {m['python']}, onnxruntime {m['onnxruntime']}, numpy "
            f"{m['numpy']}. {m['date']}; whole run {m['wall_s']:.0f} s.")


def models_table(models: dict) -> str:
    rows = ["| model | parameters | ONNX file bytes | input |", "|---|---|---|---|"]
    for n, m in models.items():
        rows.append(f"| {n} | {m.params:,} | {m.size_bytes:,} | "
                    f"{'x'.join(map(str, m.input_shape))} float32 |")
    return "\n".join(rows)


def fmt(stat: tuple[float, float, float], nd: int = 1) -> str:
    med, lo, hi = stat
    if np.isnan(med):
        return "—"
    if lo == hi or np.isnan(lo) or np.isnan(hi):
        return f"{med:,.{nd}f}"
    return f"{med:,.{nd}f} ({lo:,.{nd}f}–{hi:,.{nd}f})"


def ratio(a: Measured, b: Measured, attr: str, ga: str = "main",
          gb: str = "main") -> tuple[float, float, float]:
    """Per-repetition a/b (the repetitions ran interleaved), as (median, min, max)."""
    r = [x / y for x, y in zip(a.values(attr, ga), b.values(attr, gb))]
    return float(np.median(r)), min(r), max(r)


def pct(stat: tuple[float, float, float]) -> str:
    """A ratio's (median, min, max) as a signed change: "−29 % (−33 to −25)"."""
    med, lo, hi = (100 * (v - 1) for v in stat)
    sign = lambda v: f"{v:+.0f}".replace("-", "−")  # noqa: E731
    return f"{sign(med)} %" if lo == hi else f"{sign(med)} % ({sign(lo)} to {sign(hi)})"


def render(mach, models, ms: dict[str, Measured], reps, sweep, loads, pairs, noisy,
           sut, sut_models) -> str:
    out = [machine_line(mach), "",
           f"Each cell: median of {reps} repetitions" + (" (min–max)" if reps > 1 else "")
           + "; throughput in inferences/s, latency in ms, one sample per request.", "",
           models_table(models), ""]
    out += _b012(models, ms)
    if any(k.endswith("/pinned x1") for k in ms):
        out += _sweep(models, ms, sweep, sut, sut_models)
        out += _poisson(models, ms, loads, sut)
    out += _halves(ms, [(a, b) for a, b in pairs if f"halves {a}+{b}" in ms])
    out += _noisy(ms, [(v, nb) for v, nb in noisy if f"noisy {v}<-{nb} sliced alone" in ms])
    if sut:
        out += _sut(models, ms, sweep, sut, sut_models)
    retried = sum(m.retries for m in ms.values())
    foreign = [r.foreign_cores for m in ms.values() for run in m.runs for r in run.values()]
    thr = mach.get("max_foreign", 0.25)
    hit = [k for k, m in ms.items() if any(r.foreign_cores > thr for run in m.runs
                                           for r in run.values())]
    out += [f"Noise: other processes used a median {np.median(foreign):.2f} cores "
            f"(max {max(foreign):.2f}) during the kept runs; {retried} disturbed repetitions "
            f"were run again; {mach.get('quiet_wait_s', 0):.0f} s spent waiting for a quiet "
            f"machine. Kept repetitions disturbed by more than {thr:g} cores of other "
            f"processes: {', '.join(hit) if hit else 'none'}."]
    return "\n".join(out)


def _b012(models, ms) -> list[str]:
    out = ["### B0, B1, B2", "",
           "| model | B0 p50 | B0 p99 | B0 /s | B1 /s | B2 /s | B2 vs B1 | B2 spin off /s |"
           " spin off vs B1 |", "|---|---|---|---|---|---|---|---|---|"]
    for name in models:
        b0, b1, b2 = (ms[f"{name}/{k}"] for k in ("B0", "B1", "B2"))
        off = ms.get(f"{name}/B2 spin off")
        out.append(
            f"| {name} | {fmt(b0.stat('p50_ms'), 3)} | {fmt(b0.stat('p99_ms'), 3)} | "
            f"{fmt(b0.stat('throughput'))} | {fmt(b1.stat('throughput'))} | "
            f"{fmt(b2.stat('throughput'))} | {pct(ratio(b2, b1, 'throughput'))} | "
            f"{fmt(off.stat('throughput')) if off else '—'} | "
            f"{pct(ratio(off, b1, 'throughput')) if off else '—'} |")
    return out + [""]


def _sweep(models, ms, sweep, sut, sut_models) -> list[str]:
    n = len(CORES)
    out = ["### Concurrency sweep (closed loop, one process per caller)", "",
           f"Pinned: single-thread sessions, caller i pinned to core i mod {n} (x{n} is B1). "
           f"All-cores: sessions with {n} threads, nothing pinned (x1 is B0, x{n} is B2).", ""]
    trio = (("throughput", 1), ("p50_ms", 2), ("p99_ms", 2))
    for name in models:
        has_sut = sut is not None and name in sut_models
        head = ("| callers | pinned /s | pinned p50 | pinned p99 | all-cores /s | "
                "all-cores p50 | all-cores p99 |")
        if has_sut:
            head += f" {sut.label} /s | {sut.label} p50 | {sut.label} p99 |"
        out += [f"**{name}**", "", head, "|---" * (7 + 3 * has_sut) + "|"]
        for c in sweep:
            p = ms[f"{name}/B1" if c == n else f"{name}/pinned x{c}"]
            a = ms[f"{name}/B0" if c == 1 else f"{name}/B2" if c == n else f"{name}/all-cores x{c}"]
            row = [p, a] + ([ms[f"{name}/SUT x{c}"]] if has_sut else [])
            cells = [str(c)] + [fmt(x.stat(k), nd) for x in row for k, nd in trio]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def _poisson(models, ms, loads, sut) -> list[str]:
    out = ["### Poisson arrivals at 50/80/95 % of B1 (open loop)", "",
           f"Served by the B1 setup: one FIFO, {len(CORES)} pinned single-thread sessions; "
           "latency from each request's scheduled arrival, so queueing counts. Unserved: "
           "arrivals of the window still queued 2 s after it (overload).", "",
           "| model | load | offered /s | done /s | p50 | p90 | p99 | unserved |",
           "|---|---|---|---|---|---|---|---|"]
    for name in models:
        for load in loads:
            for key, who in ((f"{name}/poisson {load:.0%}", "B1"),
                             (f"{name}/SUT poisson {load:.0%}", sut.label if sut else "")):
                if key not in ms:
                    continue
                x = ms[key]
                out.append(f"| {name} {who} | {load:.0%} | {fmt(x.stat('offered_rate'))} | "
                           f"{fmt(x.stat('throughput'))} | {fmt(x.stat('p50_ms'), 2)} | "
                           f"{fmt(x.stat('p90_ms'), 2)} | {fmt(x.stat('p99_ms'), 2)} | "
                           f"{int(max(x.values('unserved')))} |")
    return out + [""]


def _halves(ms, pairs) -> list[str]:
    if not pairs:
        return []
    out = ["### Two models on half the cores each vs each alone (raw onnxruntime)", "",
           "Half: the model's single-thread sessions pinned to its half of the cores, the "
           "other model running on the other half in the same window. Alone: its B1 "
           "(whole machine, same run).", "",
           "| pair | model | alone (B1) /s | on its half /s | half / alone |",
           "|---|---|---|---|---|"]
    for a, b in pairs:
        half = ms[f"halves {a}+{b}"]
        for grp, name in (("a", a), ("b", b)):
            alone = ms[f"{name}/B1"]
            out.append(f"| {a} + {b} | {name} | {fmt(alone.stat('throughput'))} | "
                       f"{fmt(half.stat('throughput', grp))} | "
                       f"{fmt(ratio(half, alone, 'throughput', grp), 3)} |")
    return out + [""]


def _noisy(ms, noisy) -> list[str]:
    if not noisy:
        return []
    out = ["### Noisy neighbour (raw onnxruntime)", "",
           "Victim: one closed-loop caller. Sliced: victim single-thread pinned to core "
           f"{CORES[0]}, the neighbour's single-thread callers pinned to the other cores. "
           f"Shared: both sessions on all {len(CORES)} cores, nothing pinned. Alone: the "
           "same victim with no neighbour.", "",
           "| victim ← neighbour | slices | victim p50 alone | p50 with | p99 alone | p99 with "
           "| p99 change | victim /s change |", "|---|---|---|---|---|---|---|---|"]
    for v, nb in noisy:
        for mode in ("sliced", "shared"):
            al, wi = (ms[f"noisy {v}<-{nb} {mode} {w}"] for w in ("alone", "with"))
            st = lambda m, k: fmt(m.stat(k, "victim"), 2)  # noqa: E731
            out.append(
                f"| {v} ← {nb} | {mode} | {st(al, 'p50_ms')} | {st(wi, 'p50_ms')} | "
                f"{st(al, 'p99_ms')} | {st(wi, 'p99_ms')} | "
                f"{pct(ratio(wi, al, 'p99_ms', 'victim', 'victim'))} | "
                f"{pct(ratio(wi, al, 'throughput', 'victim', 'victim'))} |")
    return out + [""]


def _sut(models, ms, sweep, sut, sut_models) -> list[str]:
    import sut as sut_mod
    out = [f"### {sut.label} against the references (same run)", "",
           "| model | figure | measured | target |", "|---|---|---|---|"]
    for name in models:
        if name not in sut_models:
            continue
        best = max(ms[f"{name}/SUT x{c}"].stat("throughput")[0] for c in sweep)
        for fig, val, tgt in sut_mod.verdicts(
                sut, ms[f"{name}/B0"].stat("p50_ms")[0], ms[f"{name}/B1"].stat("throughput")[0],
                ms[f"{name}/SUT x1"].stat("p50_ms")[0], best):
            out.append(f"| {name} | {fig} | {val} | {tgt} |")
    return out + [""]
