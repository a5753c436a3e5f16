"""Per-kernel micro-benchmark: ours, Liger-Kernel's and plain torch, forward + backward, in this process.

    python bench/kernel_bench.py [--only rms_norm,rope,swiglu,geglu,linear_ce,lora_qkv,lora_gate_up]
        [--iters 20] [--warmup 5] [--tokens 8192] [--lora-dtype fp32] [--no-check] [--out kernel-bench.json]
    TRITON_INTERPRET=1 python bench/kernel_bench.py --tiny    # CPU smoke run of tiny shapes

Llama-3.1-8B shapes, bf16, CUDA: rows = --tokens (4 × 2048), hidden 4096, intermediate 14336, 32 q and 8 kv heads
of 128, vocab 128256, LoRA r=16. Every kernel runs in three columns: ours (`adapter_doctor.kernels`), Liger's
public autograd Functions (the column says n/a when `liger_kernel` does not import or cannot run here) and the
torch reference. The two LoRA rows (q/k/v and gate/up of one input) have no Liger counterpart.

What one iteration measures: the forward, then `torch.autograd.grad(outputs, inputs, grad_outputs)` with a fixed
random gradient of each output (1 for a loss), taking the gradients of the activations and of any trained
parameter (RMSNorm's weight, the LoRA factors; lm_head and the LoRA base weights are frozen). Several kernels
write into their inputs or into the incoming gradients, so every iteration gets fresh copies of both, made
before the timed region, the same for all columns: activations are outputs of an op (a clone of a leaf), laid
out as in the model (q and k are transposed views of [batch, seq, heads, dim] tensors, as the projections make
them), and each output gradient has its output's strides. The gradients are returned, not accumulated into
`.grad`. Times are CUDA events around forward + backward, queued behind a GPU busy-wait so that they count the
GPU's work and any host synchronisation, not the host's launch latency; the median of --iters after --warmup,
in ms. Ratios are Liger/ours and torch/ours (> 1: ours faster). Peak MiB is the rise of
torch.cuda.max_memory_allocated over one more iteration (inputs and output gradients already allocated).
Each library runs as its training integration calls it: RMSNorm with Llama casting; ours writes dx into a
fresh buffer (the runtime's call), Liger into dy (LigerRMSNorm's in_place=True).

LoRA A and B are fp32 by default, as PEFT's get_peft_model leaves them on a bf16 base (autocast_adapter_dtype),
and so as bench/train_bench.py trains them; --lora-dtype bf16 for adapters cast to the base's dtype.

Before timing, --check (on by default) compares each column's outputs and input gradients with the torch
column's and prints the largest absolute difference; a column off by more than a few bf16 roundings anywhere
(|diff| > 2⁻⁶·|ref| + 2⁻⁷·max|ref|) is flagged OFF in the table, since a benchmark of a wrong kernel is
worthless. On CPU (--tiny under TRITON_INTERPRET=1) times are wall-clock and mean nothing beyond "it ran";
Liger's kernels mostly fail or misbehave under the interpreter, and their column says so.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import version  # noqa: E402

KERNELS = ["rms_norm", "rope", "swiglu", "geglu", "linear_ce", "lora_qkv", "lora_gate_up"]
COLUMNS = ["ours", "liger", "torch"]
RTOL, ATOL_OF_MAX = 2.0 ** -6, 2.0 ** -7  # |diff| <= RTOL·|ref| + ATOL_OF_MAX·max|ref|: a few bf16 roundings
SLEEP_CYCLES = 5_000_000  # ~3 ms of GPU busy-wait ahead of each timed iteration, so the host queues ahead


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rank: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def llama_8b(tokens: int) -> Shape:
    seq = min(2048, tokens)
    if tokens % seq:
        raise SystemExit(f"--tokens {tokens} is not a multiple of the sequence length {seq}")
    return Shape(tokens // seq, seq, hidden=4096, intermediate=14336, q_heads=32, kv_heads=8, head_dim=128,
                 vocab=128256, rank=16)


TINY = Shape(batch=2, seq=16, hidden=64, intermediate=96, q_heads=4, kv_heads=2, head_dim=16, vocab=512, rank=4)


@dataclass
class Case:
    """One kernel: how to make an iteration's fresh inputs, and each column's function of them."""
    name: str
    shape: str
    make_inputs: Callable[[], list[Any]]  # fresh activations, outputs of an op
    columns: dict[str, Callable[..., tuple] | None]  # (*inputs) -> outputs; None where there is no such kernel
    params: list[Any] = field(default_factory=list)  # leaves used as they are; differentiated if they require grad
    note: str = ""
    absent: str = "liger_kernel does not import"  # what the Liger column says when it has no function


def liger(module: str, name: str) -> Any:
    """`liger_kernel.ops.<module>.<name>` (the Triton implementation itself, not a dispatcher's choice), or None
    when Liger does not import or has no such Function."""
    try:
        return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), name)
    except (ImportError, AttributeError):
        return None


def tensor(*size: int, device: str, dtype: Any, scale: float = 1.0, grad: bool = True) -> Any:
    """A random leaf: N(0, scale²) in `dtype`."""
    import torch

    return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_(grad)


def rms_norm_case(shape: Shape, device: str, dtype: Any, lora_dtype: Any) -> Case:
    from adapter_doctor.kernels.rms_norm import rms_norm_reference, rms_norm_triton

    n, eps = shape.tokens, 1e-5
    x = tensor(n, shape.hidden, device=device, dtype=dtype)
    w = (1 + tensor(shape.hidden, device=device, dtype=dtype, scale=0.1, grad=False)).detach().requires_grad_(True)
    fn = liger("rms_norm", "LigerRMSNormFunction")
    return Case("rms_norm", f"x [{n}, {shape.hidden}], w [{shape.hidden}]", lambda: [x.clone()], params=[w], columns={
        "ours": lambda x: (rms_norm_triton(x, w, eps),),
        "liger": fn and (lambda x: (fn.apply(x, w, eps, 0.0, "llama", True),)),
        "torch": lambda x: (rms_norm_reference(x, w, eps),)},
        note="Llama casting; Liger in_place=True (dx into dy), ours in_place=False, as each trains")


def rope_case(shape: Shape, device: str, dtype: Any, lora_dtype: Any) -> Case:
    import torch
    from adapter_doctor.kernels.rope import rope_reference, rope_triton

    b, s, hd = shape.batch, shape.seq, shape.head_dim
    # q and k as the projections make them, [b, s, h, d]; every column sees them through transposed views
    # [b, h, s, d], as attention hands them over. Their gradients are taken, not the views' (a view's grad_fn is
    # regenerated when its base is rotated in place).
    qs = tensor(b, s, shape.q_heads, hd, device=device, dtype=dtype)
    ks = tensor(b, s, shape.kv_heads, hd, device=device, dtype=dtype)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(s, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # [1, seq, head_dim], as Llama's rotary module returns it
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    fn = liger("rope", "LigerRopeFunction")

    def heads_first(rope_fn: Callable[..., Any]) -> Callable[..., tuple]:
        return lambda q, k: tuple(rope_fn(q.transpose(1, 2), k.transpose(1, 2)))

    return Case(
        "rope", f"q [{b}, {shape.q_heads}, {s}, {hd}], k [{b}, {shape.kv_heads}, {s}, {hd}]",
        lambda: [qs.clone(), ks.clone()], columns={
            "ours": heads_first(lambda q, k: rope_triton(q, k, cos, sin)),
            "liger": fn and heads_first(lambda q, k: fn.apply(q, k, cos, sin, None, 1)),
            "torch": heads_first(lambda q, k: rope_reference(q, k, cos, sin))},
        note="q, k: transposed views of [b, s, h, d]; ours and Liger rotate them in place")


def gated_case(name: str, ours: Callable[..., Any], reference: Callable[..., Any], liger_name: str) -> Callable:
    def build(shape: Shape, device: str, dtype: Any, lora_dtype: Any) -> Case:
        size = (shape.batch, shape.seq, shape.intermediate)
        gate, up = tensor(*size, device=device, dtype=dtype), tensor(*size, device=device, dtype=dtype)
        fn = liger(name, liger_name)
        return Case(name, f"gate, up [{', '.join(map(str, size))}]", lambda: [gate.clone(), up.clone()], columns={
            "ours": lambda g, u: (ours(g, u),),
            "liger": fn and (lambda g, u: (fn.apply(g, u),)),
            "torch": lambda g, u: (reference(g, u),)},
            note="ours and Liger write d gate, d up into gate's and up's buffers")
    return build


def linear_ce_case(shape: Shape, device: str, dtype: Any, lora_dtype: Any) -> Case:
    import torch
    import torch.nn.functional as F
    from adapter_doctor.kernels.cross_entropy import linear_cross_entropy_triton

    n = shape.tokens
    hidden = tensor(n, shape.hidden, device=device, dtype=dtype)
    head = tensor(shape.vocab, shape.hidden, device=device, dtype=dtype, scale=0.02, grad=False)  # frozen lm_head
    labels = torch.randint(0, shape.vocab, (n,), device=device)  # already shifted
    labels[torch.rand(n, device=device) < 0.05] = -100
    fn = liger("fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    return Case(
        "linear_ce", f"hidden [{n}, {shape.hidden}], lm_head [{shape.vocab}, {shape.hidden}] frozen",
        lambda: [hidden.clone()], columns={
            "ours": lambda h: (linear_cross_entropy_triton(h, head, labels),),
            "liger": fn and (lambda h: (fn.apply(h, head, labels, None, None, -100, 0.0, 0.0, "mean")[0],)),
            "torch": lambda h: (F.cross_entropy(F.linear(h, head).float(), labels),)},
        note="~5% of labels -100, mean over the rest")


def lora_case(name: str, outs: Callable[[Shape], tuple[int, ...]]) -> Callable:
    def build(shape: Shape, device: str, dtype: Any, lora_dtype: Any) -> Case:
        from adapter_doctor.kernels.lora_linear import LoraParts, lora_multi_linear_fused, lora_multi_linear_reference

        x = tensor(shape.tokens, shape.hidden, device=device, dtype=dtype)
        parts = [LoraParts(tensor(out, shape.hidden, device=device, dtype=dtype, scale=0.02, grad=False), None,
                           tensor(shape.rank, shape.hidden, device=device, dtype=lora_dtype, scale=0.02),
                           tensor(out, shape.rank, device=device, dtype=lora_dtype, scale=0.02), 1.0)
                 for out in outs(shape)]
        kinds = f"W {str(dtype).removeprefix('torch.')} frozen, A and B {str(lora_dtype).removeprefix('torch.')}"
        return Case(
            name, f"x [{shape.tokens}, {shape.hidden}] -> {', '.join(map(str, outs(shape)))}, r={shape.rank}",
            lambda: [x.clone()], params=[t for p in parts for t in (p.lora_a, p.lora_b)], columns={
                "ours": lambda x: tuple(lora_multi_linear_fused(x, parts)),
                "liger": None,
                "torch": lambda x: tuple(lora_multi_linear_reference(x, parts))},
            note=f"{kinds}, scaling 1; torch is PEFT's order, one projection at a time",
            absent="Liger has no such kernel")
    return build


def kv_width(shape: Shape) -> int:
    return shape.head_dim * shape.kv_heads


def builders() -> dict[str, Callable[..., Case]]:
    from adapter_doctor.kernels.swiglu import geglu_reference, geglu_triton, swiglu_reference, swiglu_triton

    return {
        "rms_norm": rms_norm_case,
        "rope": rope_case,
        "swiglu": gated_case("swiglu", swiglu_triton, swiglu_reference, "LigerSiLUMulFunction"),
        "geglu": gated_case("geglu", lambda g, u: geglu_triton(g, u, "tanh"),
                            lambda g, u: geglu_reference(g, u, "tanh"), "LigerGELUMulFunction"),
        "linear_ce": linear_ce_case,
        "lora_qkv": lora_case("lora_qkv", lambda s: (s.hidden, kv_width(s), kv_width(s))),
        "lora_gate_up": lora_case("lora_gate_up", lambda s: (s.intermediate, s.intermediate)),
    }


def trained(case: Case, inputs: list[Any]) -> list[Any]:
    return inputs + [p for p in case.params if p.requires_grad]


def output_grads(outputs: tuple, values: list[Any]) -> list[Any]:
    """Fresh copies of the fixed output gradients, each laid out like its output."""
    import torch

    return [torch.empty_like(o).copy_(v) for o, v in zip(outputs, values)]


def fixed_grads(outputs: tuple) -> list[Any]:
    import torch

    generator = torch.Generator(device=outputs[0].device).manual_seed(1)
    return [torch.ones_like(o) if o.dim() == 0 else
            torch.randn(o.shape, generator=generator, device=o.device, dtype=torch.float32).to(o.dtype)
            for o in outputs]


def evaluate(case: Case, fn: Callable[..., tuple], values: list[Any]) -> tuple[list[Any], list[Any]]:
    """fp32 copies of the outputs, and the gradients of the inputs then of the trained parameters."""
    import torch

    inputs = case.make_inputs()
    outputs = fn(*inputs)
    copies = [o.detach().float().clone() for o in outputs]  # some backwards write into buffers the outputs share
    grads = torch.autograd.grad(outputs, trained(case, inputs), output_grads(outputs, values))
    return copies, [g.detach().float() for g in grads]


def compare(got: tuple[list[Any], list[Any]], ref: tuple[list[Any], list[Any]]) -> dict:
    """Max abs difference per output and per gradient, and whether every element of every one is within the
    bf16 tolerance of the reference."""
    result: dict[str, Any] = {"ok": True}
    for kind, mine, theirs in zip(("outputs", "grads"), got, ref):
        result[kind] = [float((a - b).abs().max()) if a.shape == b.shape else float("nan")
                        for a, b in zip(mine, theirs)]
        result["ok"] &= len(mine) == len(theirs) and all(
            a.shape == b.shape and bool(((a - b).abs() <= ATOL_OF_MAX * b.abs().max() + RTOL * b.abs()).all())
            for a, b in zip(mine, theirs))
    diffs = result["outputs"] + result["grads"]
    result["max_abs_diff"] = max(diffs, key=lambda d: float("inf") if d != d else d)  # a NaN is the worst
    return result


def time_column(case: Case, fn: Callable[..., tuple], values: list[Any], iters: int, warmup: int,
                cuda: bool) -> dict:
    """Median ms of forward + backward over `iters` iterations, and the peak memory of one more."""
    import torch

    def prepare() -> tuple[list[Any], list[Any]]:
        # The output gradients' layout comes from a forward of this column, run once before.
        inputs = case.make_inputs()
        return inputs, [torch.empty_strided(shape, stride, dtype=v.dtype, device=v.device).copy_(v)
                        for (shape, stride), v in zip(layout, values)]

    def step(inputs: list[Any], grads: list[Any]) -> None:
        outputs = fn(*inputs)
        torch.autograd.grad(outputs, trained(case, inputs), grads)

    first = fn(*case.make_inputs())
    layout = [(o.shape, o.stride()) for o in first]
    del first
    sleep = getattr(torch.cuda, "_sleep", None)
    samples = []
    for _ in range(warmup + iters):
        inputs, grads = prepare()
        if cuda:
            torch.cuda.synchronize()
            if sleep is not None:
                sleep(SLEEP_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(inputs, grads)
            end.record()
            samples.append((start, end))
        else:
            begin = time.perf_counter()
            step(inputs, grads)
            samples.append(time.perf_counter() - begin)
        del inputs, grads
    if cuda:
        torch.cuda.synchronize()
        ms = [start.elapsed_time(end) for start, end in samples[warmup:]]
    else:
        ms = [seconds * 1e3 for seconds in samples[warmup:]]
    result = {"ms": statistics.median(ms), "min_ms": min(ms)}
    if cuda:
        inputs, grads = prepare()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(inputs, grads)
        torch.cuda.synchronize()
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


def error_text(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:200]


def check_column(case: Case, column: str, fn: Callable[..., tuple], values: list[Any], ref: Any) -> dict:
    result = compare(evaluate(case, fn, values), ref)
    each = "; ".join(f"{kind} " + ", ".join(f"{d:.3g}" for d in result[kind]) for kind in ("outputs", "grads"))
    print(f"check {case.name:<12} {column:<5} max abs diff {result['max_abs_diff']:.3g} ({each}) "
          f"{'ok' if result['ok'] else 'OFF'}", flush=True)
    return result


def run_case(case: Case, iters: int, warmup: int, check: bool, cuda: bool) -> dict:
    import torch

    columns: dict[str, dict] = {c: {} if case.columns.get(c) else {"error": case.absent} for c in COLUMNS}
    runnable = {c: fn for c, fn in case.columns.items() if fn is not None}

    def attempt(column: str, work: Callable[[], dict]) -> dict:
        """work()'s result, or {} once the column is recorded as unable to run here (Liger under the
        interpreter, out of memory): it is then left out of what follows."""
        try:
            return work()
        except Exception as error:  # noqa: BLE001 - a column that cannot run here is recorded, not fatal
            columns[column]["error"] = error_text(error)
            del runnable[column]
            print(f"{case.name:<12} {column:<5} failed: {columns[column]['error']}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
            return {}

    values = fixed_grads(case.columns["torch"](*case.make_inputs()))
    if check:
        ref = evaluate(case, case.columns["torch"], values)
        for column, fn in list(runnable.items()):
            result = attempt(column, lambda column=column, fn=fn: check_column(case, column, fn, values, ref))
            if result:
                columns[column]["check"] = result
        del ref
    for column, fn in list(runnable.items()):
        columns[column].update(attempt(column, lambda fn=fn: time_column(case, fn, values, iters, warmup, cuda)))
    ours = columns["ours"].get("ms")
    ratios = {f"{c}_over_ours": columns[c]["ms"] / ours if ours and columns[c].get("ms") else None
              for c in ("liger", "torch")}
    return {"kernel": case.name, "shape": case.shape, "note": case.note, "columns": columns, **ratios}


def table(results: list[dict], checked: bool) -> str:
    def ms(entry: dict) -> str:
        return f"{entry['ms']:.3f}" if "ms" in entry else "n/a"

    def mib(entry: dict) -> str:
        return f"{entry['peak_mib']:,.0f}" if "peak_mib" in entry else "n/a"

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    rows = ["| kernel | ours ms | Liger ms | torch ms | Liger/ours | torch/ours | peak MiB ours / Liger / torch "
            "| check |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cols = [r["columns"][c] for c in COLUMNS]
        off = [f"{c} {e['check']['max_abs_diff']:.3g}" for c, e in zip(COLUMNS, cols)
               if "check" in e and not e["check"]["ok"]]
        check = ("OFF: " + ", ".join(off)) if off else "ok" if checked else "not checked"
        rows.append(f"| {r['kernel']} | {' | '.join(ms(e) for e in cols)} | {ratio(r['liger_over_ours'])} | "
                    f"{ratio(r['torch_over_ours'])} | {' / '.join(mib(e) for e in cols)} | {check} |")
    return "\n".join(rows)


def plain(value: Any) -> Any:
    """`value` with NaN (a kernel's NaN output, found by --check) as None, so that the file is strict JSON."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(KERNELS), help="comma-separated: " + ",".join(KERNELS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8192, help="rows: batch × 2048 (8B shapes only)")
    parser.add_argument("--lora-dtype", choices=["fp32", "bf16"], default="fp32",
                        help="LoRA A and B dtype; PEFT's get_peft_model makes them fp32 on a bf16 base")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    parser.add_argument("--out", type=Path, default=Path("kernel-bench.json"))
    args = parser.parse_args()
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(KERNELS))
    if unknown:
        parser.error(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(KERNELS)}")

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not (args.tiny and os.environ.get("TRITON_INTERPRET") == "1"):
        parser.error("no CUDA device: only `TRITON_INTERPRET=1 python bench/kernel_bench.py --tiny` runs on CPU")
    shape = TINY if args.tiny else llama_8b(args.tokens)
    lora_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.lora_dtype]
    build, results = builders(), []
    for name in names:  # one case's tensors at a time, each from the same seed whatever --only says
        torch.manual_seed(0)
        case = build[name](shape, "cuda" if cuda else "cpu", torch.bfloat16, lora_dtype)
        results.append(run_case(case, args.iters, args.warmup, args.check, cuda))
        del case
    report = plain({
        "device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)",
        "timing": "cuda events, median" if cuda else "wall clock, median (interpreter: not a speed)",
        "torch": torch.__version__, "triton": version("triton"), "liger_kernel": version("liger-kernel"),
        "shape": vars(shape), "dtype": "bf16", "lora_dtype": args.lora_dtype, "iters": args.iters,
        "warmup": args.warmup, "checked": args.check, "results": results,
    })
    args.out.write_text(json.dumps(report, indent=1))
    print(table(results, args.check))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
