"""A C load generator for the latency rows: ``wrk`` (Debian package ``wrk``).

Python's ``http.client`` costs about 0.2 ms per request on these cores (building
the request, parsing the status line and headers, ``json.loads`` of the reply):
client time that shows up as "serving overhead" although no server spends it.
``wrk`` (one thread, one keep-alive connection = one sequential caller) is the
usual way HTTP servers are timed; its percentiles come from its own histogram in
microseconds, read here through a Lua ``done`` hook as JSON. Rows measured with
it say so; the ``http.client`` rows stay in the tables beside them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from harness import RunResult

_LUA = """
wrk.method = %(method)s
wrk.body = %(body)s
wrk.headers["Content-Type"] = %(ctype)s
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "p50": %%d, "p90": %%d, "p99": %%d, '
    .. '"mean": %%.3f, "max": %%d, "errors": %%d, "status": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max,
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def _lua_bytes(data: bytes) -> str:
    """A Lua string literal holding exactly ``data`` (binary tensors included)."""
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"' if data else '""'


def available() -> bool:
    return shutil.which("wrk") is not None


def run(url: str, path: str, *, body: bytes = b"", ctype: str = "application/json",
        method: str = "POST", seconds: float = 3.0, connections: int = 1,
        headers: dict[str, str] | None = None, label: str = "wrk") -> RunResult:
    """``connections`` keep-alive callers (closed loop) for ``seconds``."""
    extra = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
                       for k, v in (headers or {}).items())
    lua = _LUA % {"method": json.dumps(method), "body": _lua_bytes(body),
                  "ctype": json.dumps(ctype), "headers": extra}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", f.name,
             "--timeout", "30s", url.rstrip("/") + path],
            capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        Path(f.name).unlink(missing_ok=True)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {out[-500:]!r}")
    s = json.loads(line[len("WRKJSON "):])
    dur = s["duration_us"] / 1e6
    return RunResult(group="wrk", label=label, callers=connections, duration_s=dur,
                     completed=s["requests"], throughput=s["requests"] / dur,
                     p50_ms=s["p50"] / 1000, p90_ms=s["p90"] / 1000, p99_ms=s["p99"] / 1000,
                     mean_ms=s["mean"] / 1000, max_ms=s["max"] / 1000,
                     errors=s["errors"] + s["status"])
