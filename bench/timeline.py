"""Where the GPU waits in a profiled step: the compute stream's idle time, by phase and by what the host did.

Reads a chrome trace that torch.profiler exported. The compute stream is the stream with the most kernel
time. Each gap between two of its kernels is charged to the phase (a `record_function` range: forward,
backward, optimizer) in which the host launched the kernel after the gap, and split in two:

- host-late: the launch came after the previous kernel had ended, so the GPU waited for the host to get
  there; the host operators that launched those kernels are listed by the idle time they cost;
- waiting: the launch came earlier, so the kernel waited on something else (an event of another stream,
  such as a copy back from the host).
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

PHASES = ("forward", "backward", "optimizer")
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _load(path: Path) -> list[dict]:
    events = json.loads(Path(path).read_text())
    return events["traceEvents"] if isinstance(events, dict) else events


def _phase_ranges(events: list[dict]) -> list[tuple[float, float, str]]:
    return sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                  if e.get("cat") == "user_annotation" and e.get("name") in PHASES)


def _inside(ranges: list[tuple[float, float, str]], starts: list[float], ts: float) -> str:
    i = bisect.bisect_right(starts, ts) - 1
    return ranges[i][2] if i >= 0 and ts <= ranges[i][1] else "other"


class _Ops:
    """The host operators, to name the innermost one around a launch."""

    def __init__(self, events: list[dict]):
        self.ops = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "cpu_op")
        self.starts = [o[0] for o in self.ops]
        self.longest = max((o[1] - o[0] for o in self.ops), default=0.0)

    def around(self, ts: float) -> str:
        i = bisect.bisect_right(self.starts, ts) - 1
        best = None
        while i >= 0 and self.ops[i][0] >= ts - self.longest:  # an op that began earlier may still contain ts
            start, end, name = self.ops[i]
            if end >= ts and (best is None or end - start < best[1] - best[0]):
                best = self.ops[i]
                if end - start < 1.0:
                    break
            i -= 1
        return best[2] if best else "(no operator)"


def gaps(path: Path, steps: int = 1, top: int = 15) -> dict[str, Any]:
    """Idle time of the compute stream per step (ms): in all, per phase host-late and waiting, and the host
    operators whose launches came late, by the idle time they cost."""
    events = _load(path)
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    device = [e for e in events if e.get("cat") in _DEVICE_CATS and "stream" in e.get("args", {})]
    if not device:
        return {}
    busy: dict[Any, float] = {}
    for e in device:
        busy[e["args"]["stream"]] = busy.get(e["args"]["stream"], 0.0) + e["dur"]
    stream = max(busy, key=busy.get)
    kernels = sorted((e for e in device if e["args"]["stream"] == stream), key=lambda e: e["ts"])
    ranges = _phase_ranges(events)
    starts = [r[0] for r in ranges]
    ops = _Ops(events)
    phases: dict[str, dict[str, float]] = {}
    late_ops: dict[str, float] = {}
    end = kernels[0]["ts"] + kernels[0]["dur"]
    for k in kernels[1:]:
        gap = k["ts"] - end
        launched = launches.get(k["args"].get("correlation"))
        if gap > 0 and launched is not None:
            phase = phases.setdefault(_inside(ranges, starts, launched), {"host_late_ms": 0.0, "waiting_ms": 0.0})
            late = min(gap, max(0.0, launched - end))  # the part of the gap before the host launched it
            phase["host_late_ms"] += late
            phase["waiting_ms"] += gap - late
            if late:
                name = ops.around(launched)
                late_ops[name] = late_ops.get(name, 0.0) + late
        end = max(end, k["ts"] + k["dur"])
    span = end - kernels[0]["ts"]

    def ms(us: float) -> float:
        return round(us / 1e3 / steps, 2)

    return {"stream_busy_ms": ms(busy[stream]), "stream_span_ms": ms(span), "idle_ms": ms(span - busy[stream]),
            "phases": {p: {k: ms(v) for k, v in d.items()} for p, d in sorted(phases.items())},
            "host_late_by_operator": [{"name": n[:90], "ms": ms(v)}
                                      for n, v in sorted(late_ops.items(), key=lambda kv: -kv[1])[:top]]}
