"""config: the node's config file, and the last known good one.

- After every successful start the agent keeps the file it started from as
  ``<config>.last-good`` (written atomically, mode 0600: it holds the broker's
  password; rewritten only when it changed).
- At start, a config that cannot be read, parsed or validated while the last good
  one can (with the same command-line overrides) is moved aside as
  ``<config>.broken-<UTC time>`` for the technician, the last good one is put in
  its place, and the agent starts from it; the agent journals a ``config_corrupt``
  fault (:func:`load_guarded`). No last good copy, or a broken one too: the
  original error, as before -- never a guess.
- While the agent runs, :class:`ConfigCheck` re-reads the file: a broken one (an
  edit gone wrong, a truncated write) is a ``config_corrupt`` fault, healed the
  same way, so the next start works; the running agent keeps the config it has.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cloud_sync.atomic import write_atomic

from ..errors import ConfigError
from .base import Check, Finding, HealError


def last_good_path(path: Path) -> Path:
    return path.with_name(path.name + ".last-good")


def _load(path: Path, overrides: dict[str, Any]):
    from ..config import load_config

    return load_config(path, **overrides)


def keep_last_good(path: Path | None) -> bool:
    """Keep the config the agent started from as the last good one; True if written."""
    if path is None:
        return False
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        return False
    lg = last_good_path(path)
    try:
        if lg.read_bytes() == data:
            return False
    except OSError:
        pass
    write_atomic(lg, data, mode=0o600)
    return True


def _set_aside(path: Path) -> Path | None:
    """Keep a copy of the broken file aside (None if there is none) and put the last
    good one in its place (atomically, the broken file's mode or 0600): the config
    path never stands empty, not even for a moment (a start then would find none)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    broken = path.with_name(f"{path.name}.broken-{stamp}")
    mode = 0o600
    try:
        mode = path.stat().st_mode & 0o777
        write_atomic(broken, path.read_bytes(), mode=mode)
    except FileNotFoundError:
        broken = None
    write_atomic(path, last_good_path(path).read_bytes(), mode=mode)
    return broken


def load_guarded(path: Path | None, **overrides: Any):
    """``load_config(path, **overrides)``, falling back on the last good config.

    Returns ``(cfg, note)``: ``note`` is None when the file was fine, else a dict
    (``fault``, ``detail``, ``remedy``, ``broken``, ``error``) for the fault journal.
    Raises the original :class:`ConfigError` when there is nothing good to fall back on.
    """
    if path is None:
        return _load(None, overrides), None
    path = Path(path)
    try:
        return _load(path, overrides), None
    except ConfigError as err:
        first = err
    lg = last_good_path(path)
    if not lg.exists():
        raise first
    try:
        cfg = _load(lg, overrides)
    except ConfigError:
        raise first from None
    missing = not path.exists()
    broken = _set_aside(path)
    kept = f"; the broken one is kept as {broken.name}" if broken else " (it was missing)"
    note = {"fault": "config_missing" if missing else "config_corrupt", "error": str(first),
            "broken": str(broken) if broken else None,
            "detail": f"{path.name}: {first}",
            "remedy": f"started from the last known good config{kept}"}
    return cfg, note


class ConfigCheck(Check):
    name = "config"
    interval_s = 10.0  # reading and validating one small file: cheap

    def __init__(self, path: Path | None, overrides: dict[str, Any] | None = None,
                 interval_s: float | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        if interval_s is not None:
            self.interval_s = interval_s

    def probe(self) -> Finding:
        if self.path is None:
            return Finding(self.name, True, "no config file (options only)")
        lg = last_good_path(self.path)
        data = {"path": str(self.path), "last_good": lg.exists()}
        try:
            _load(self.path, self.overrides)
        except ConfigError as err:
            missing = not self.path.exists()
            return Finding(self.name, False, f"{self.path.name}: {err}",
                           fault="config_missing" if missing else "config_corrupt",
                           data={**data, "error": str(err)})
        return Finding(self.name, True, f"{self.path} valid" + (
            "" if lg.exists() else "; no last good copy yet"), data=data)

    def heal(self, finding: Finding) -> str:
        if self.path is None:
            raise HealError("no config file")
        lg = last_good_path(self.path)
        if not lg.exists():
            raise HealError(f"no last good config ({lg.name}) to put back; "
                            "the technician must fix the file")
        try:
            _load(lg, self.overrides)
        except ConfigError as err:
            raise HealError(f"the last good config does not load either: {err}") from None
        broken = _set_aside(self.path)
        finding.data["broken"] = str(broken) if broken else None
        return ("put the last known good config back" +
                (f"; the broken one is kept as {broken.name}" if broken else "") +
                " (the running agent keeps its config; the next start uses this one)")
