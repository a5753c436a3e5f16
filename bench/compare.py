"""HF+PEFT, HF+PEFT+Liger and ours, side by side on one GPU: each configuration in its own process.

    python bench/compare.py [--sizes 1b,3b,8b] [--seq 2048] [--bs 4] [--longest] [--out results.json]

For every size it runs `bench/train_bench.py` once per variant (Liger only when `liger_kernel` imports),
HF and Liger with gradient checkpointing as their users run them at these sizes, ours with its own memory
plan, then prints a table with tokens/s, peak memory, MFU and ratios to HF+PEFT, and writes the JSON.
`--longest` also finds, for 8B at batch 1, the longest sequence each variant trains (doubling until it runs
out of memory).

    python bench/compare.py --qlora [--sizes 8b] [--seq 2048] [--bs 2] [--out bench/results/qlora.json]

QLoRA instead: writes the random-initialised base once as a bf16 checkpoint, then runs `bench/qlora_bench.py`
once per variant (`qlora_bench.VARIANTS`), each loading it in nf4 in its own process; `hf` is profiled for
what is live at its memory peak.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 300  # one configuration's process, model build included


def run(size: str, variant: str, seq: int, bs: int, gc: bool, steps: int = 10, warmup: int = 3) -> dict:
    cmd = [sys.executable, str(HERE / "train_bench.py"), "--size", size, "--variant", variant, "--seq", str(seq),
           "--bs", str(bs), "--steps", str(steps), "--warmup", str(warmup)] + (["--gc"] if gc else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"size": size, "variant": variant, "seq": seq, "bs": bs, "gc": gc, "error": f"over {TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        oom = "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr
        return {"size": size, "variant": variant, "seq": seq, "bs": bs, "gc": gc,
                "error": "out of memory" if oom else done.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def variants() -> list[tuple[str, bool]]:
    """(variant, gradient checkpointing) pairs to run."""
    out = [("hf", True), ("ours", False), ("ours", True)]
    if importlib.util.find_spec("liger_kernel") is not None:
        out.insert(1, ("liger", True))
    return out


# Where each variant's doubling search starts (one step at each length; the sequence count is 1).
LONGEST_START = {"hf": 8192, "liger": 32768, "ours": 32768}


def longest(variant: str, gc: bool, limit: int) -> dict:
    """The longest sequence (a power of two from LONGEST_START) `variant` trains at 8B, batch 1, up to `limit`."""
    best, seq = None, LONGEST_START[variant]
    while seq <= limit:
        result = run("8b", variant, seq, 1, gc, steps=1, warmup=0)
        if "error" in result:
            return {"variant": variant, "gc": gc, "longest": best, "first_failure": seq, "error": result["error"]}
        best, seq = result, seq * 2
    return {"variant": variant, "gc": gc, "longest": best, "first_failure": None}


def run_qlora(checkpoint: Path, variant: str, seq: int, bs: int, profile: bool, as_loaded: bool) -> dict:
    cmd = [sys.executable, str(HERE / "qlora_bench.py"), "--checkpoint", str(checkpoint), "--variant", variant,
           "--seq", str(seq), "--bs", str(bs)] + (["--profile-memory"] if profile else []) \
        + (["--as-loaded"] if as_loaded else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "seq": seq, "bs": bs, "error": f"over {TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        oom = "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr
        return {"variant": variant, "seq": seq, "bs": bs,
                "error": "out of memory" if oom else done.stderr.strip().splitlines()[-3:]}
    return json.loads(lines[-1])


def qlora(size: str, seq: int, bs: int, checkpoint: Path, variants: list[str], as_loaded: bool) -> list[dict]:
    if not (checkpoint / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "qlora_bench.py"), "--size", size, "--write-checkpoint",
                        str(checkpoint)], check=True, timeout=TIMEOUT_S)
    results = []
    for variant in variants:
        results.append(run_qlora(checkpoint, variant, seq, bs, variant == "hf", as_loaded))
        print(json.dumps(results[-1]), flush=True)  # each as it ends: a later one may not
    return results


def qlora_table(results: list[dict]) -> str:
    rows = ["| variant | tok/s | peak GiB | MFU | vs HF+PEFT | stream dtype |", "|---|---|---|---|---|---|"]
    base = next((r["tok_s"] for r in results if r["variant"] == "hf" and "tok_s" in r), None)
    for r in results:
        if "error" in r:
            rows.append(f"| {r['variant']} | {r['error']} | | | | |")
            continue
        ratio = f"{r['tok_s'] / base:.2f}x" if base else ""
        rows.append(f"| {r['variant']} | {r['tok_s']:,} | {r['peak_gib']} | {r['mfu']:.1%} | {ratio} | "
                    f"{r.get('layer_input')} |")
    return "\n".join(rows)


def table(results: list[dict]) -> str:
    rows = ["| size | variant | gc | tok/s | peak GiB | MFU | vs HF+PEFT |", "|---|---|---|---|---|---|---|"]
    base = {r["size"]: r["tok_s"] for r in results if r["variant"] == "hf" and "tok_s" in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['size']} | {r['variant']} | {r['gc']} | {r['error']} | | | |")
            continue
        ratio = r["tok_s"] / base[r["size"]] if base.get(r["size"]) else float("nan")
        rows.append(f"| {r['size']} | {r['variant']} | {r['gc']} | {r['tok_s']:,} | {r['peak_gib']} | "
                    f"{r['mfu']:.1%} | {ratio:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1b,3b,8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--longest", action="store_true")
    parser.add_argument("--longest-limit", type=int, default=131072, help="stop the doubling search here")
    parser.add_argument("--skip-speed", action="store_true", help="only the --longest search")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--qlora", action="store_true", help="the QLoRA variants instead (use --bs 2 for the issue's shape)")
    parser.add_argument("--qlora-checkpoint", type=Path, default=Path("/tmp/qlora-base"))
    parser.add_argument("--qlora-variants", help="comma-separated subset of qlora_bench.VARIANTS")
    parser.add_argument("--qlora-as-loaded", action="store_true", help="leave the model in eval mode, as loaded")
    args = parser.parse_args()
    if args.qlora:
        sys.path.insert(0, str(HERE))
        from qlora_bench import VARIANTS

        size = args.sizes if "," not in args.sizes else "8b"
        chosen = args.qlora_variants.split(",") if args.qlora_variants else VARIANTS
        results = qlora(size, args.seq, args.bs, args.qlora_checkpoint / size, chosen, args.qlora_as_loaded)
        args.out.write_text(json.dumps({"results": results}, indent=1))
        print(qlora_table(results))
        return
    results = [] if args.skip_speed else [run(size, variant, args.seq, args.bs, gc)
                                          for size in args.sizes.split(",") for variant, gc in variants()]
    report: dict = {"results": results}
    if args.longest:  # every variant with checkpointing: without it, none gets far at batch 1
        report["longest"] = [longest(variant, True, args.longest_limit) for variant, gc in variants() if gc]
    args.out.write_text(json.dumps(report, indent=1))
    print(table(results))
    for entry in report.get("longest", []):
        best = entry["longest"] or {}
        print(f"longest 8b bs1 {entry['variant']} gc={entry['gc']}: {best.get('seq')} "
              f"({best.get('peak_gib')} GiB, {best.get('tok_s')} tok/s); first failure {entry['first_failure']}")


if __name__ == "__main__":
    main()
