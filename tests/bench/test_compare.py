"""bench/compare.py's bookkeeping, without a GPU: each process is a stand-in that prints the row it was asked for."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def compare(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # compare imports its sibling scripts by name
    spec = importlib.util.spec_from_file_location("adapter_doctor_bench_compare", BENCH / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "installed", lambda name: False)  # neither Liger nor Unsloth: three rows
    return module


def fake_processes(monkeypatch, compare, stop_at: int | None = None):
    """subprocess.run answering each benchmark command with a row naming its variant; the call numbered `stop_at`
    raises KeyboardInterrupt instead, as a launch stopped from outside would end."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        variant = cmd[cmd.index("--variant") + 1]
        row = {"variant": variant, "gc": "--gc" in cmd, "tok_s": 1000 * len(calls), "peak_gib": 1.0}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(compare.subprocess, "run", run)
    return calls


def launch(compare, monkeypatch, out: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["compare.py", "--sizes", "8b", "--out", str(out)])
    compare.main()


def test_a_whole_launch_writes_the_report_and_leaves_no_partial_file(compare, monkeypatch, tmp_path):
    calls = fake_processes(monkeypatch, compare)
    out = tmp_path / "speed.json"
    launch(compare, monkeypatch, out)
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["gc"]) for r in rows] == [("hf", True), ("ours", False), ("ours", True)]
    assert len(calls) == 3 and not (tmp_path / "speed.partial.json").exists()


def test_a_launch_stopped_part_way_keeps_the_rows_it_finished(compare, monkeypatch, tmp_path):
    fake_processes(monkeypatch, compare, stop_at=3)
    out = tmp_path / "speed.json"
    with pytest.raises(KeyboardInterrupt):
        launch(compare, monkeypatch, out)
    assert not out.exists()
    partial = json.loads((tmp_path / "speed.partial.json").read_text())
    assert partial["partial"] is True
    assert [(r["variant"], r["gc"], r["tok_s"]) for r in partial["rows"]] == [("hf", True, 1000), ("ours", False, 2000)]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_process_is_a_row_with_its_error(compare, monkeypatch, tmp_path):
    def run(cmd, **kwargs):
        if "hf" in cmd:
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Traceback\ntorch.OutOfMemoryError: CUDA out of memory")

    monkeypatch.setattr(compare.subprocess, "run", run)
    out = tmp_path / "speed.json"
    launch(compare, monkeypatch, out)
    rows = json.loads(out.read_text())["results"]
    assert [r["error"] for r in rows] == [f"over {compare.TIMEOUT_S} s", "out of memory", "out of memory"]


def test_modes_combine_into_one_launch_and_one_report_keyed_by_mode(compare, monkeypatch, tmp_path):
    calls = fake_processes(monkeypatch, compare)
    out = tmp_path / "all.json"
    monkeypatch.setattr(sys, "argv", ["compare.py", "--sizes", "8b", "--out", str(out), "--packed", "--speed",
                                      "--longest", "--longest-lengths", "262144"])
    compare.main()
    report = json.loads(out.read_text())
    assert list(report) == ["speed", "packed"]  # MODES order, whatever the flags' order
    assert [(r["variant"], r["gc"]) for r in report["speed"]["results"]] == [("hf", True), ("ours", False),
                                                                             ("ours", True)]
    assert [e["variant"] for e in report["speed"]["longest"]] == ["hf", "ours"]
    assert [c[c.index("--layout") + 1] for c in calls if "--layout" in c] == ["padded", "padded", "packed", "packed"]
    assert len(calls) == 3 + 4 + 2 and not (tmp_path / "all.partial.json").exists()
    # the searches' long steps come after every table's rows
    assert [c[c.index("--variant") + 1] for c in calls[7:]] == ["hf", "ours"]
    assert all(c[c.index("--seq") + 1] == "262144" for c in calls[7:])
    assert all(r["process_s"] >= 0 for r in report["speed"]["results"] + report["packed"]["results"])


def test_every_mode_runs_each_batch_size_and_a_bad_list_is_a_usage_error(compare, monkeypatch, tmp_path, capsys):
    calls = fake_processes(monkeypatch, compare)
    (tmp_path / "8b").mkdir()
    (tmp_path / "8b" / "config.json").write_text("{}")  # the QLoRA base, written once before
    out = tmp_path / "both.json"
    monkeypatch.setattr(sys, "argv", ["compare.py", "--sizes", "8b", "--out", str(out), "--speed", "--qlora",
                                      "--bs", "2,4", "--qlora-variants", "hf,ours", "--base-dir", str(tmp_path)])
    compare.main()
    batch = [int(c[c.index("--bs") + 1]) for c in calls]
    assert batch == [2, 2, 2, 4, 4, 4] + [2, 2, 4, 4]  # speed: three variants a size; QLoRA: the two chosen
    monkeypatch.setattr(sys, "argv", ["compare.py", "--bs", "2,x"])
    with pytest.raises(SystemExit) as stopped:
        compare.main()
    assert stopped.value.code == 2 and "comma-separated positive integers" in capsys.readouterr().err


def lengths_answering(monkeypatch, compare, fits: int) -> list[int]:
    """subprocess.run where a step of `fits` tokens or fewer trains and a longer one runs out of memory."""
    tried = []

    def run(cmd, **kwargs):
        seq = int(cmd[cmd.index("--seq") + 1])
        tried.append(seq)
        if seq > fits:
            return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="torch.OutOfMemoryError: CUDA out of memory")
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"seq": seq, "tok_s": 1}) + "\n", stderr="")

    monkeypatch.setattr(compare.subprocess, "run", run)
    return tried


def test_the_longest_search_doubles_from_its_start_while_steps_run(compare, monkeypatch):
    monkeypatch.setitem(compare.LONGEST_START, "hf", 16384)
    tried = lengths_answering(monkeypatch, compare, fits=70000)
    found = compare.longest("train_bench.py", "hf", 1 << 20)
    assert tried == [16384, 32768, 65536, 131072]
    assert found["longest"]["seq"] == 65536 and found["first_failure"] == 131072 and found["error"] == "out of memory"


def test_the_longest_search_halves_from_a_start_that_does_not_fit(compare, monkeypatch):
    tried = lengths_answering(monkeypatch, compare, fits=40000)
    found = compare.longest("train_bench.py", "ours", 1 << 20)
    assert tried == [262144, 131072, 65536, 32768]  # and no doubling after a failure
    assert found["longest"]["seq"] == 32768 and found["first_failure"] == 65536


def test_the_longest_search_stops_at_its_limit_and_at_its_floor(compare, monkeypatch):
    tried = lengths_answering(monkeypatch, compare, fits=1 << 30)
    found = compare.longest("train_bench.py", "ours", 262144)
    assert tried == [262144] and found["first_failure"] is None and "error" not in found
    assert found["variant"] == "ours" and found["longest"]["seq"] == 262144
    monkeypatch.setitem(compare.LONGEST_START, "hf", 16384)
    tried = lengths_answering(monkeypatch, compare, fits=100)
    found = compare.longest("train_bench.py", "hf", 1 << 20)
    assert tried == [16384, 8192, 4096, 2048, 1024] and found["longest"] is None and found["first_failure"] == 1024
