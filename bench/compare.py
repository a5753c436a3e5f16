"""HF+PEFT, HF+PEFT+Liger, Unsloth and ours, side by side on one GPU: each configuration in its own process.

    python bench/compare.py [--sizes 1b,3b,8b] [--seq 2048] [--bs 4] [--longest] [--out results.json]

For every size and batch size (`--bs 2,4`: both) it runs `bench/train_bench.py` once per variant: HF and
Liger with gradient checkpointing as their users run them at these sizes, ours without and with its offloaded
checkpointing, Unsloth with its own. Liger runs when `liger_kernel` imports, Unsloth when `unsloth` does (from
a base checkpoint written once under --base-dir). It prints a table with tokens/s, peak memory and ratios to
HF+PEFT (each row's JSON has its MFU), and writes the JSON.
`--longest` also finds, for 8B at batch 1 under a --memory-gib cap (80: an 80 GB card), the longest sequence
each variant trains: from a start per variant (`LONGEST_START`), doubling while a step runs and up to
`--longest-limit`, halving while it runs out of memory; `--skip-speed` runs the search alone, and
`--longest-lengths 262144,400000` tries those lengths in turn instead (one step each, up to 590 s a process).

    python bench/compare.py --qlora [--sizes 8b] [--seq 2048] [--bs 2,4] [--longest] [--out bench/results/qlora.json]

QLoRA: `bench/qlora_bench.py` once per variant (`qlora_bench.VARIANTS`) and batch size, each loading
the base checkpoint in nf4 in its own process; `hf` is profiled for what is live at its memory peak.

    python bench/compare.py --packed [--sizes 8b] [--out bench/results/packed.json]

Documents of realistic lengths (`bench/packed_bench.py`): HF+PEFT, Liger, Unsloth and ours padded, Unsloth and
ours packed, effective (real-token) tokens/s and the ratio to HF+PEFT padded.

    python bench/compare.py --multigpu 2 [--sizes 8b] [--bs 4] [--out bench/results/multigpu-2gpu.json]

Several GPUs (`bench/multigpu.py`): each (engine, variant, checkpointing) row in its own launch on N GPUs and
again on one GPU with N micro-batches a step (the same global batches), 50 steps: tokens/s per GPU and in all,
the scaling, peak memory per GPU, how far the N-GPU loss curve strays from the one-GPU curve, and whether the
adapter rank 0 saved reloads in vanilla PEFT with identical logits.

The modes combine: `--speed --packed --longest` runs the bf16 speed table, the realistic-length run and the
long-context search in one launch, each variant still in its own process, and writes one report keyed by mode
(`speed`, `packed`, `qlora`, `multigpu`); a single mode keeps its report's own shape. The searches run after
every mode's rows: their steps take minutes each.

`--profile` adds, to the rows of ours (speed and QLoRA runs), where a step's time goes. Every speed and QLoRA
row says where its reserved GPU memory sits, by stream and pool (`reserved_by_pool`), and every row how long
its process took, model build included (`process_s`). Each row is also written to `<out>.partial.json` as its
process ends, so a launch stopped part-way keeps what it finished; the file goes once the whole report is
written.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 420  # one configuration's process, model build included
LONGEST_TIMEOUT_S = 590  # each step of a --longest search: 214 s at 262,144 tokens (8B), quadratic beyond


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def flags(options: dict) -> list[str]:
    """Command-line flags for `options`: True a bare flag, None and False none, anything else its value."""
    out: list[str] = []
    for key, value in options.items():
        if value is True:
            out.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:  # 0 is a value, not a missing flag
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


class Rows:
    """Every process's row as it ends, rewritten to `path` each time: a launch stopped part-way (a time limit, a
    crash, Ctrl-C) keeps the rows it finished there. `main` removes the file once the whole report is written."""

    def __init__(self, path: Path | None = None):
        self.path, self.rows = path, []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if self.path is not None:
            part = self.path.with_name(self.path.name + ".tmp")
            part.write_text(json.dumps({"partial": True, "rows": self.rows}, indent=1, default=str))
            os.replace(part, self.path)  # never half a file
        return row


ROWS = Rows()  # main() points it at <out>.partial.json


def run(script: str, timeout: int = TIMEOUT_S, **options) -> dict:
    """One benchmark process; its last JSON line, or the options with an `error`."""
    cmd = [sys.executable, str(HERE / script), *flags(options)]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ROWS.add({**options, "error": f"over {timeout} s"})
    process_s = round(time.monotonic() - started, 1)  # model build included: what a launch's plan needs
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        oom = "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr
        return ROWS.add({**options, "error": "out of memory" if oom else done.stderr.strip().splitlines()[-3:],
                         "rc": done.returncode, "process_s": process_s})
    result = {**json.loads(lines[-1]), "process_s": process_s}
    print(json.dumps(result), flush=True)  # each as it ends: a later one may not
    return ROWS.add(result)


def speed_variants() -> list[tuple[str, bool]]:
    """(variant, gradient checkpointing) pairs to run."""
    out = [("hf", True), ("ours", False), ("ours", True)]
    if installed("liger_kernel"):
        out.insert(1, ("liger", True))
    if installed("unsloth"):
        out.append(("unsloth", True))
    return out


def base(args: argparse.Namespace, size: str) -> Path:
    path = args.base_dir / size
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "qlora_bench.py"), "--size", size, "--write-checkpoint",
                        str(path)], check=True, timeout=TIMEOUT_S)
    return path


# Where each variant's search starts (one step at each length; the sequence count is 1): near what it reached on an
# 80 GB budget before, since a step of 8B at 262,144 tokens takes minutes. Unsloth: its own table gives 342,733
# tokens for 8B in 4-bit on 80 GB; bf16 weights take 10 GB more, so it starts one step under the others' limit.
LONGEST_START = {"hf": 32768, "liger": 65536, "ours": 262144, "unsloth": 131072,
                 "ours-bf16-offload": 131072}
LONGEST_FLOOR = 1024  # a search going down stops here


def longest(script: str, variant: str, limit: int, lengths: list[int] | None = None, **options) -> dict:
    """The longest sequence `variant` trains at batch 1: of `lengths` in turn (stopping at the first failure), or
    from LONGEST_START doubling up to `limit` while each step runs, halving while it fails."""
    search = not lengths
    tries = [min(LONGEST_START.get(variant, 8192), limit)] if search else list(lengths)
    best, failure, error = None, None, None
    while tries:
        seq = tries.pop(0)
        result = run(script, timeout=LONGEST_TIMEOUT_S, variant=variant, seq=seq, bs=1, steps=1, warmup=0,
                     **options)
        if "error" in result:
            failure, error = seq, result["error"]
            if search and best is None and seq // 2 >= LONGEST_FLOOR:
                tries.append(seq // 2)  # the start was too long: go down
            else:
                break
        else:
            best = result
            if search and failure is None and seq * 2 <= limit:
                tries.append(seq * 2)
    return {"variant": variant, "longest": best, "first_failure": failure,
            **({"error": error} if error is not None else {})}


def longest_lengths(args: argparse.Namespace) -> list[int] | None:
    return sorted(map(int, args.longest_lengths.split(","))) if args.longest_lengths else None


def table(results: list[dict], base_of, columns: list[str]) -> str:
    """Markdown rows: the `columns` of each result, tok/s, peak GiB and the ratio to `base_of(result)`."""
    rows = ["| " + " | ".join(columns) + " | tok/s | peak GiB | vs HF+PEFT |", "|---" * (len(columns) + 3) + "|"]
    for r in results:
        keys = " | ".join(str(r.get(c)) for c in columns)
        if "error" in r:
            rows.append(f"| {keys} | {r['error']} | | |")
            continue
        reference = base_of(r)
        ratio = f"{r['tok_s'] / reference:.2f}x" if reference else ""
        rows.append(f"| {keys} | {r['tok_s']:,} | {r['peak_gib']} | {ratio} |")
    return "\n".join(rows)


def hf_rates(results: list[dict], key: Callable[[dict], Any]) -> dict:
    """HF+PEFT's tok/s by `key(result)`: what each row's ratio is taken against."""
    return {key(r): r["tok_s"] for r in results if r.get("variant") == "hf" and "tok_s" in r}


def speed(args: argparse.Namespace) -> dict:
    results = []
    if not args.skip_speed:
        for size in args.sizes.split(","):
            checkpoint = base(args, size) if installed("unsloth") else None
            for bs in args.bs:
                for variant, gc in speed_variants():
                    results.append(run("train_bench.py", size=size, variant=variant, seq=args.seq, bs=bs, gc=gc,
                                       checkpoint=checkpoint if variant == "unsloth" else None,
                                       profile=args.profile and variant == "ours", reserved=True))
    hf = hf_rates(results, lambda r: (r.get("size"), r.get("bs")))
    print(table(results, lambda r: hf.get((r.get("size"), r.get("bs"))), ["size", "bs", "variant", "gc"]))
    return {"results": results}


def speed_longest(args: argparse.Namespace) -> list[dict]:
    """bf16 8B at batch 1: every variant with checkpointing (without it, none gets far)."""
    checkpoint = base(args, "8b") if installed("unsloth") else None
    return [longest("train_bench.py", variant, args.longest_limit, longest_lengths(args), size="8b", gc=True,
                    memory_gib=args.memory_gib, checkpoint=checkpoint if variant == "unsloth" else None)
            for variant, gc in speed_variants() if gc]


def qlora_variants(args: argparse.Namespace) -> list[str]:
    if str(HERE) not in sys.path:  # asked by the rows and again by the search
        sys.path.insert(0, str(HERE))
    from qlora_bench import VARIANTS

    return args.qlora_variants.split(",") if args.qlora_variants else \
        [v for v in VARIANTS if (v != "liger" or installed("liger_kernel"))
         and (not v.startswith("unsloth") or installed("unsloth"))]


def one_size(args: argparse.Namespace) -> str:
    """The size of a mode that runs one (QLoRA, packed, multi-GPU): --sizes when it names one, else 8B."""
    return args.sizes if "," not in args.sizes else "8b"


def qlora(args: argparse.Namespace) -> dict:
    checkpoint = base(args, one_size(args))
    results = [] if args.skip_speed else [
        run("qlora_bench.py", checkpoint=checkpoint, variant=variant, seq=args.seq, bs=bs,
            profile_memory=variant == "hf", profile=args.profile and variant.startswith("ours"),
            as_loaded=args.qlora_as_loaded, reserved=True)
        for bs in args.bs for variant in qlora_variants(args)]
    hf = hf_rates(results, lambda r: r.get("bs"))
    print(table(results, lambda r: hf.get(r.get("bs")), ["variant", "bs", "layer_input"]))
    return {"results": results}


def qlora_longest(args: argparse.Namespace) -> list[dict]:
    checkpoint = base(args, one_size(args))
    return [longest("qlora_bench.py", variant, args.longest_limit, longest_lengths(args), checkpoint=checkpoint,
                    memory_gib=args.memory_gib)
            for variant in qlora_variants(args) if variant in ("hf", "unsloth", "ours-bf16-offload", "liger")]


def packed(args: argparse.Namespace) -> dict:
    size = one_size(args)
    checkpoint = base(args, size) if installed("unsloth") else None
    rows = [("hf", "padded", True), ("ours", "padded", False), ("ours", "packed", False), ("ours", "packed", True)]
    if installed("liger_kernel"):
        rows.insert(1, ("liger", "padded", True))
    if installed("unsloth"):
        rows += [("unsloth", "padded", True), ("unsloth", "packed", True)]
    results = [run("packed_bench.py", size=size, variant=variant, layout=layout, gc=gc,
                   checkpoint=checkpoint if variant == "unsloth" else None) for variant, layout, gc in rows]
    hf = hf_rates(results, lambda r: r.get("layout"))
    print(table(results, lambda r: hf.get("padded"), ["variant", "layout", "gc", "fill"]))
    return {"results": results}


MULTIGPU_ROWS = [("ddp", "hf", True), ("fsdp2", "hf", True), ("fsdp2", "liger", True), ("ddp", "ours", False),
                 ("ddp", "ours", True), ("fsdp2", "ours", False), ("fsdp2", "ours", True)]


def launch(gpus: int, out: Path, **options) -> dict:
    """One torchrun launch of multigpu.py for one row; its row, or the options with an `error`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
           str(HERE / "multigpu.py"), "--out", str(out), *flags(options)]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return ROWS.add({**options, "gpus": gpus, "error": f"over {TIMEOUT_S} s"})
    if done.returncode != 0 or not out.exists():
        return ROWS.add({**options, "gpus": gpus, "error": done.stderr.strip().splitlines()[-3:],
                         "rc": done.returncode})
    row = json.loads(out.read_text())["results"][0]
    print(json.dumps(row), flush=True)
    return ROWS.add(row)


def multigpu(args: argparse.Namespace) -> dict:
    size, gpus, (bs,) = one_size(args), args.multigpu, args.bs
    rows = [r for r in MULTIGPU_ROWS if r[1] != "liger" or installed("liger_kernel")]
    if args.multigpu_rows:  # e.g. "ddp-hf-on,fsdp2-ours-off": a subset, for launches that must fit a time limit
        chosen = set(args.multigpu_rows.split(","))
        rows = [r for r in rows if f"{r[0]}-{r[1]}-{'on' if r[2] else 'off'}" in chosen]
    report: dict = {"gpus": gpus, "rows": []}
    work = args.base_dir / "multigpu"
    for engine, variant, gc in rows:
        name = f"{engine}-{variant}-gc-{'on' if gc else 'off'}"
        common = dict(size=size, seq=args.seq, bs=bs, engines=engine, variants=variant,
                      gc="on" if gc else "off", steps=47, warmup=3)
        many = launch(gpus, work / f"{name}-{gpus}.json", check_save=work / "saved", **common)
        one = launch(1, work / f"{name}-1.json", accumulate=gpus, **common)
        entry = {"engine": engine, "variant": variant, "gc": gc, "gpus": many, "one_gpu": one}
        if "error" not in many and "error" not in one:
            after = list(zip(many["losses"], one["losses"]))[common["warmup"]:]
            entry["scaling"] = round(many["tok_s"] / one["tok_s"], 3)
            entry["curve_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in after)
        report["rows"].append(entry)
    hf = {r["engine"]: r["gpus"]["tok_s"] for r in report["rows"] if r["variant"] == "hf" and "tok_s" in r["gpus"]}
    lines = [f"| engine | variant | gc | tok/s ({gpus} GPUs) | per GPU | scaling | peak GiB/GPU | vs HF+PEFT | "
             "curve vs 1 GPU | reload identical |", "|---" * 10 + "|"]
    for r in report["rows"]:
        many = r["gpus"]
        if "error" in many:
            lines.append(f"| {r['engine']} | {r['variant']} | {r['gc']} | {many['error']} | | | | | | |")
            continue
        ratio = f"{many['tok_s'] / hf[r['engine']]:.2f}x" if r["engine"] in hf else ""
        lines.append(f"| {r['engine']} | {r['variant']} | {r['gc']} | {many['tok_s']:,} | {many['tok_s_per_gpu']:,} | "
                     f"{r.get('scaling')} | {many['peak_gib']} | {ratio} | {r.get('curve_max_rel_diff', 0):.2e} | "
                     f"{(many.get('save') or {}).get('identical')} |")
    print("\n".join(lines))
    return report


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sizes


MODES = {"speed": speed, "packed": packed, "qlora": qlora, "multigpu": multigpu}  # the order a launch runs them in
# --longest's searches run after every mode's rows: their steps take minutes, so a launch cut short by a time limit
# loses a search's last step rather than a table.
SEARCHES = {"speed": speed_longest, "qlora": qlora_longest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1b,3b,8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=batch_sizes, default=[4],
                        help="comma-separated batch sizes, each a row per variant (--multigpu: one)")
    parser.add_argument("--longest", action="store_true")
    parser.add_argument("--longest-limit", type=int, default=524288,
                        help="the search doubles up to this length, no further")
    parser.add_argument("--longest-lengths", help="comma-separated lengths to try instead of doubling")
    parser.add_argument("--memory-gib", type=float, default=80.0, help="the --longest search's GPU memory cap")
    parser.add_argument("--skip-speed", action="store_true", help="only the --longest search (of every mode named)")
    parser.add_argument("--profile", action="store_true", help="profile the GPU time of ours' steps")
    parser.add_argument("--base-dir", type=Path, default=Path("/tmp/bench-base"),
                        help="where the random-initialised base checkpoints are written, once")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--speed", action="store_true",
                        help="the bf16 speed table (the default when no other mode is named)")
    parser.add_argument("--qlora", action="store_true", help="the QLoRA variants")
    parser.add_argument("--qlora-variants", help="comma-separated subset of qlora_bench.VARIANTS")
    parser.add_argument("--qlora-as-loaded", action="store_true", help="leave the model in eval mode, as loaded")
    parser.add_argument("--packed", action="store_true", help="documents of realistic lengths, packed and padded")
    parser.add_argument("--multigpu", type=int, metavar="N", help="the rows of bench/multigpu.py on N GPUs and on one")
    parser.add_argument("--multigpu-rows", help="comma-separated ENGINE-VARIANT-on|off, a subset of MULTIGPU_ROWS")
    args = parser.parse_args()
    if args.multigpu and len(args.bs) != 1:
        parser.error("--multigpu takes one --bs")
    global ROWS
    ROWS = Rows(args.out.with_name(args.out.stem + ".partial.json"))
    modes = {name: mode for name, mode in MODES.items() if getattr(args, name)} or {"speed": speed}
    reports = {name: mode(args) for name, mode in modes.items()}
    if args.longest:
        for name, search in SEARCHES.items():
            if name in reports:
                reports[name]["longest"] = search(args)
    # One mode keeps its report's own shape; several are keyed by mode.
    report = next(iter(reports.values())) if len(reports) == 1 else reports
    args.out.write_text(json.dumps(report, indent=1, default=str))  # paths in the options of failed rows
    ROWS.path.unlink(missing_ok=True)
    for entry in (e for r in reports.values() for e in r.get("longest", [])):
        best = entry["longest"] or {}
        print(f"longest bs1 {entry['variant']}: {best.get('seq')} ({best.get('peak_gib')} GiB, "
              f"{best.get('tok_s')} tok/s); first failure {entry['first_failure']}")


if __name__ == "__main__":
    main()
