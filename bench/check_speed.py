"""Wall time of `doctor check` as a whole process, beside `python -c "import peft"`, in one launch.

    python bench/check_speed.py [--runs 15] [ADAPTER]

Each command runs as a fresh process, interleaved so that both see the same machine state; the
value scan is on. Prints a table and a JSON line with min / median / max seconds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "fixtures" / "healthy" / "llama-lora"


def timed(cmd: list[str], ok: tuple[int, ...]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if done.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", nargs="?", default=str(DEFAULT))
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--python", default=sys.executable, help="interpreter that has peft installed")
    args = parser.parse_args()
    doctor = shutil.which("doctor") or sys.exit("install the package first: pip install -e .")
    commands = {  # name -> (command, acceptable exit codes); doctor exits 1 when it finds errors
        "doctor check": ([doctor, "check", args.adapter], (0, 1)),
        "python -c 'import peft'": ([args.python, "-c", "import peft"], (0,)),
    }
    for cmd, ok in commands.values():  # warm the page cache and .pyc files
        timed(cmd, ok)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, (cmd, ok) in commands.items():
            times[name].append(timed(cmd, ok))
    rows = {name: {"min": min(t), "median": statistics.median(t), "max": max(t), "runs": len(t)} for name, t in times.items()}
    print(f"{'command':28} {'min':>7} {'median':>7} {'max':>7}  (seconds, {args.runs} runs)")
    for name, r in rows.items():
        print(f"{name:28} {r['min']:7.3f} {r['median']:7.3f} {r['max']:7.3f}")
    print(json.dumps({"adapter": args.adapter, "results": rows}))


if __name__ == "__main__":
    main()
