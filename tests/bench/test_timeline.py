"""bench/timeline.py on hand-made chrome traces: which gaps it charges to the host and which to waiting."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from timeline import gaps  # noqa: E402

MS = 1000  # the trace counts µs; the times below are in ms


def kernel(ts, dur, corr, stream=7):
    return {"cat": "kernel", "name": f"k{corr}", "ts": ts * MS, "dur": dur * MS,
            "args": {"stream": stream, "correlation": corr}}


def launch(ts, corr):
    return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts * MS, "dur": 2, "args": {"correlation": corr}}


def op(name, ts, dur, cat="cpu_op"):
    return {"cat": cat, "name": name, "ts": ts * MS, "dur": dur * MS}


@pytest.fixture
def trace(tmp_path):
    events = [
        op("forward", 0, 100, "user_annotation"), op("backward", 100, 200, "user_annotation"),
        op("Lora4bitMultiLinearFunction", 0, 60), op("aten::mm", 45, 8), op("aten::add_", 140, 20),
        launch(5, 1), kernel(10, 20, 1),  # busy 10-30
        launch(50, 2), kernel(55, 10, 2),  # idle 25: launched 20 after the end (inside aten::mm), then 5 waiting
        launch(40, 3), kernel(160, 10, 3),  # launched early, yet idle 95: waiting, charged to the launch's phase
        launch(150, 4), kernel(200, 40, 4),  # idle 30, launched before the previous end: waiting (backward)
        launch(260, 5), kernel(262, 8, 5),  # idle 22: 20 late, outside every operator, then 2 waiting
        kernel(0, 50, 99, stream=8),  # a side stream's copy, less time in all: not the compute stream
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_gaps_split_host_late_and_waiting_by_phase(trace):
    found = gaps(trace)
    assert found["stream_busy_ms"] == pytest.approx(88)  # 20 + 10 + 10 + 40 + 8 on stream 7
    assert found["stream_span_ms"] == pytest.approx(260)
    assert found["idle_ms"] == pytest.approx(172)
    forward, backward = found["phases"]["forward"], found["phases"]["backward"]
    assert forward == {"host_late_ms": pytest.approx(20), "waiting_ms": pytest.approx(100)}
    assert backward == {"host_late_ms": pytest.approx(20), "waiting_ms": pytest.approx(32)}
    names = {row["name"]: row["ms"] for row in found["host_late_by_operator"]}
    assert names == {"aten::mm": pytest.approx(20), "(no operator)": pytest.approx(20)}


def test_gaps_per_step_and_empty_trace(trace, tmp_path):
    assert gaps(trace, steps=2)["idle_ms"] == pytest.approx(86)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([op("forward", 0, 10, "user_annotation")]))
    assert gaps(empty) == {}



def write(tmp_path, events):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_the_late_launch_is_charged_to_the_launching_threads_operator(tmp_path):
    path = write(tmp_path, [
        {**op("aten::mm", 0, 100), "tid": 1}, {**op("aten::copy_", 15, 10), "tid": 2},  # the innermost in time
        kernel(0, 10, 1), {**launch(20, 2), "tid": 1}, kernel(25, 5, 2),  # idle 15: 10 late, 5 waiting
    ])
    assert gaps(path)["host_late_by_operator"] == [{"name": "aten::mm", "ms": pytest.approx(10)}]


def test_streams_of_two_gpus_are_not_merged(tmp_path):
    def on(device, k):
        return {**k, "args": {**k["args"], "device": device}}

    # GPU 1's stream 7 is the busier one; merged with GPU 0's stream 7, busy time would exceed the span
    path = write(tmp_path, [on(0, kernel(0, 10, 1)), on(0, kernel(20, 10, 2)), on(1, kernel(5, 40, 3))])
    found = gaps(path)
    assert found["stream_busy_ms"] == pytest.approx(40) and found["idle_ms"] == 0
