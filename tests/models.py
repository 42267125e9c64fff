"""Small real models built from real data for the data-plane tests and benches.

``build_digits_app_dir`` trains an sklearn MLP on the 8x8 ``load_digits`` images
(values 0..16), converts it to ONNX with skl2onnx and writes an *app dir* the
way the agent unpacks a package: ``manifest.json``, ``model.onnx``,
``labels.txt``, plus ``test_split.npz`` (the held-out ``X_test``/``y_test``).
The training runs once per process; later calls only write files.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from appstore.samples.digits import build_digits_sample, digit_png  # noqa: F401 - re-exported
from appstore.samples.digits import digits_manifest as product_manifest

DIGITS_INPUT = "input"


@functools.lru_cache(maxsize=1)
def _sample_dir() -> Path:
    """The product's digits sample (appstore.samples.digits), built once per process."""
    return build_digits_sample(Path(tempfile.mkdtemp(prefix="aidc-digits-")))


def digits_manifest(**overrides) -> dict:
    """The digits app's manifest as a dict; ``overrides`` replace top-level keys."""
    manifest = product_manifest()
    manifest.update(overrides)
    return manifest


def build_digits_app_dir(dst: Path, manifest: dict | None = None) -> Path:
    """Write the digits app into ``dst`` (created) and return it."""
    src = _sample_dir()
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "labels.txt"):
        shutil.copyfile(src / name, dst / name)
    (dst / "manifest.json").write_text(json.dumps(manifest or digits_manifest(), indent=1))
    shutil.copyfile(src / "heldout.npz", dst / "test_split.npz")
    return dst


def load_test_split(app_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits (float32 (n, 64) in 0..16, int64 labels)."""
    with np.load(Path(app_dir) / "test_split.npz") as z:
        return z["X_test"], z["y_test"]


# --- process helpers for the data-plane tests -------------------------------


def worker_pids(marker: str) -> list[int]:
    """Live (non-zombie) ``edge_node.worker`` processes whose command line has ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "edge_node.worker" in cmdline and marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    """``pred()``'s first truthy value, polled every 50 ms; AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Killed(BaseException):
    """The process ends here (a kill -9 in a durability test): nothing after it runs."""


def killable_emit(outbox, die: str | None = None):
    """The agent's ``emit_event`` into a real outbox, with the agent killed
    ``"before"`` or ``"after"`` it queues the event (:class:`Killed`)."""
    from cloud_sync import schemas

    def emit_event(type, severity="info", app=None, data=None, msg_id=None):
        if die == "before":
            raise Killed()
        msg = schemas.EventMessage(msg_id=msg_id or schemas.new_msg_id(), type=type,
                                   severity=severity, app=app, data=data or {})
        outbox.put("events", msg.to_bytes(), msg.msg_id, kind="event")
        if die == "after":
            raise Killed()
        return True

    return emit_event
