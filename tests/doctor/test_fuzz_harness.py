"""The fuzz harness (tools/fuzz.py): its committed regression corpus replays cleanly, and every target fuzzes
for a bounded time without a crash, a hang (over 5 s an input) or a memory blow-up (over 1 GiB).

A longer run is `python tools/fuzz.py TARGET -max_total_time=3600 -timeout=5 -rss_limit_mb=1024 DIR`."""
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "fuzz"
SECONDS = 12  # per target in CI: about 1 minute and a quarter for all six


FUZZ = load_tool("fuzz")


@pytest.mark.parametrize("target", FUZZ.TARGETS)
def test_the_regression_corpus_replays_cleanly(target):
    for data in FUZZ.seeds(target):  # the seeds include every committed regression for the target
        FUZZ.run_one(target, data)


@pytest.mark.parametrize("target", FUZZ.TARGETS)
def test_each_target_fuzzes_for_a_bounded_time(target, tmp_path):
    pytest.importorskip("atheris", reason="the coverage-guided fuzzer is atheris: pip install atheris")
    # Through a shell that forks: a peak RSS is inherited across exec, so a child started straight from this large
    # test process would start above libFuzzer's memory limit; a grandchild forked from the shell starts small.
    result = subprocess.run(
        ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, str(ROOT / "tools" / "fuzz.py"), target, f"-max_total_time={SECONDS}", "-timeout=5",
         "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=SECONDS * 10)
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    assert result.returncode == 0 and not found, (found, result.stderr[-3000:])
    assert "Done" in result.stderr
