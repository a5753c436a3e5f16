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


def _innermost(events: list[dict], launches: list[tuple[Any, float]]) -> dict[tuple[Any, float], str]:
    """The innermost host operator around each (thread, time) launch, on the launching thread. A thread's
    operators nest, so one sweep in time order with a stack of the open ones finds them all."""
    ops: dict[Any, list[tuple[float, float, str]]] = {}
    for e in events:
        if e.get("cat") == "cpu_op":
            ops.setdefault(e.get("tid"), []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    found = {}
    for tid in {t for t, _ in launches}:
        mine = sorted(ops.get(tid, []), key=lambda o: (o[0], -o[1]))  # an outer op before the inner one it opens
        stack: list[tuple[float, float, str]] = []
        i = 0
        for ts in sorted(ts for t, ts in launches if t == tid):
            while i < len(mine) and mine[i][0] <= ts:
                while stack and stack[-1][1] < mine[i][0]:
                    stack.pop()
                stack.append(mine[i])
                i += 1
            while stack and stack[-1][1] < ts:
                stack.pop()
            found[tid, ts] = stack[-1][2] if stack else "(no operator)"
    return found


def gaps(path: Path, steps: int = 1, top: int = 15) -> dict[str, Any]:
    """Idle time of the compute stream per step (ms): in all, per phase host-late and waiting, and the host
    operators whose launches came late, by the idle time they cost."""
    events = _load(path)
    launches = {e["args"]["correlation"]: (e.get("tid"), e["ts"]) for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    device = [e for e in events if e.get("cat") in _DEVICE_CATS and "stream" in e.get("args", {})]
    if not device:
        return {}

    def stream_of(e: dict) -> tuple[Any, Any]:  # stream numbers repeat across GPUs
        return e["args"].get("device"), e["args"]["stream"]

    busy: dict[Any, float] = {}
    for e in device:
        busy[stream_of(e)] = busy.get(stream_of(e), 0.0) + e["dur"]
    stream = max(busy, key=busy.get)
    kernels = sorted((e for e in device if stream_of(e) == stream), key=lambda e: e["ts"])
    ranges = _phase_ranges(events)
    starts = [r[0] for r in ranges]
    phases: dict[str, dict[str, float]] = {}
    late_launches: list[tuple[tuple[Any, float], float]] = []
    end = kernels[0]["ts"] + kernels[0]["dur"]
    for k in kernels[1:]:
        gap = k["ts"] - end
        launch = launches.get(k["args"].get("correlation"))
        if gap > 0 and launch is not None:
            launched = launch[1]
            phase = phases.setdefault(_inside(ranges, starts, launched), {"host_late_ms": 0.0, "waiting_ms": 0.0})
            late = min(gap, max(0.0, launched - end))  # the part of the gap before the host launched it
            phase["host_late_ms"] += late
            phase["waiting_ms"] += gap - late
            if late:
                late_launches.append((launch, late))
        end = max(end, k["ts"] + k["dur"])
    span = end - kernels[0]["ts"]
    names = _innermost(events, [launch for launch, _ in late_launches])
    late_ops: dict[str, float] = {}
    for launch, late in late_launches:
        late_ops[names[launch]] = late_ops.get(names[launch], 0.0) + late

    def ms(us: float) -> float:
        return round(us / 1e3 / steps, 2)

    return {"stream_busy_ms": ms(busy[stream]), "stream_span_ms": ms(span), "idle_ms": ms(span - busy[stream]),
            "phases": {p: {k: ms(v) for k, v in d.items()} for p, d in sorted(phases.items())},
            "host_late_by_operator": [{"name": n[:90], "ms": ms(v)}
                                      for n, v in sorted(late_ops.items(), key=lambda kv: -kv[1])[:top]]}
