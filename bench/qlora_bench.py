"""One QLoRA training configuration, timed in this process: prints one JSON line.

    python bench/qlora_bench.py --write-checkpoint DIR --size 8b
    python bench/qlora_bench.py --checkpoint DIR --variant ours-offload --seq 2048 --bs 2 [--profile-memory]

The base is a random-initialised model of a real shape (harness.SIZES), written once as a bf16 checkpoint
and loaded as users load it: `from_pretrained` with `BitsAndBytesConfig` (nf4, double quantization, bf16
compute), LoRA r=16 on all seven projections, AdamW. Variants:

- `hf`: `prepare_model_for_kbit_training` (which casts every non-4-bit parameter to fp32 and turns on
  gradient checkpointing), then PEFT; as QLoRA users run it.
- `hf-bf16`: the same without the fp32 cast (checkpointing on): what the cast costs.
- `ours`: `hf`'s model, then `ensure_patched`.
- `ours-offload`: `ours` plus `enable_offloaded_checkpointing`.
- `ours-bf16-offload`: no fp32 cast, `ensure_patched` and `enable_offloaded_checkpointing`.
- `ours-bf16-offload-graphs`: the same with `cuda_graphs=True`: the layers replayed as CUDA graphs.
- `ours-bf16-offload-half`: the same, checkpointing every second layer (`every_n_layers=2`): memory traded
  back for speed.
- `ours-bf16`: no fp32 cast, `ensure_patched`, no checkpointing: the fastest, in the most memory.
- `liger`: `hf` with Liger-Kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy applied first.
- `unsloth`: Unsloth's `FastLanguageModel(load_in_4bit=True)` and its offloaded checkpointing (when installed).
- `unsloth-nockpt`: the same without checkpointing, the peer of `ours-bf16`.

The model is put in training mode before the first step, as Trainer does; `--as-loaded` keeps the mode
`from_pretrained` leaves (eval), in which transformers skips gradient checkpointing altogether.
`--profile-memory` records one more step's allocations and reports what was live at the peak, by the source
line that allocated it; `--profile` where a step's GPU time goes; `--reserved` where the
reserved memory sits (by stream and pool). `--time-kernels` times instead, at the 8B MLP shape, our dequantization against
bitsandbytes' and one 4-bit LoRA projection (forward and backward) against PEFT's layer on bitsandbytes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    H200_BF16_PEAK,
    SIZES,
    apply_liger,
    cap_memory,
    emit,
    flops_per_token,
    gib,
    host_plan_gib,
    kernel_profile,
    reserved_by_pool,
    targets,
    timed,
    training_step,
    unsloth_model,
    versions,
    write_base,
)

VARIANTS = ["hf", "ours-offload", "ours", "hf-bf16", "ours-bf16-offload", "ours-bf16-offload-graphs",
            "ours-bf16-offload-half", "ours-bf16", "liger", "unsloth", "unsloth-nockpt"]


def load(path: Path, variant: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    if variant == "liger":
        apply_liger(AutoConfig.from_pretrained(path).model_type)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    memory = {"loaded_gib": gib(torch.cuda.memory_allocated())}
    if "bf16" not in variant:
        model = prepare_model_for_kbit_training(model)
    elif variant != "ours-bf16":  # the other bf16 variants checkpoint, as prepare_model_for_kbit_training would
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    memory["prepared_gib"] = gib(torch.cuda.memory_allocated())
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets(model.config),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    return model, memory


def parameter_bytes(model) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return {k: gib(int(v)) for k, v in sorted(out.items())}


def live_at_peak(snapshot: dict, top: int = 12) -> list[dict]:
    """What was allocated at the step's peak, summed by the first frame outside torch's own files."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], site(event.get("frames", [])))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] in ("free_completed",) and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    sums: dict[str, int] = {}
    for size, where in at_peak.values():
        sums[where] = sums.get(where, 0) + size
    ranked = sorted(sums.items(), key=lambda kv: -kv[1])[:top]
    return [{"site": where, "gib": gib(size)} for where, size in ranked] + [{"site": "(traced peak)", "gib": gib(peak)}]


def site(frames: list[dict]) -> str:
    for frame in frames:
        name = frame.get("filename", "")
        if "site-packages/torch/" not in name and name.endswith(".py"):
            return f"{name.split('site-packages/')[-1]}:{frame.get('line')} {frame.get('name')}"
    return "(no python frame)"


def cuda_ms(fn, repeat: int = 20, trials: int = 5) -> float:
    """GPU ms per call of `fn`: the median over `trials` of `repeat` back-to-back calls, queued behind a GPU
    busy-wait so that the host's cost of each call (a launch from Python, about as long as a dequantization)
    is hidden and the events time the GPU's work alone."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        torch.cuda._sleep(repeat * 200_000)  # ~0.1 ms of GPU time a call: longer than the host takes to queue one
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / repeat)
    return round(sorted(times)[trials // 2], 4)


def time_kernels(tokens: int = 4096, inp: int = 4096, out: int = 14336) -> dict:
    import types

    import bitsandbytes as bnb
    import torch
    import torch.nn as nn
    from adapter_doctor.kernels.dequant4bit import dequantize_4bit_triton, lora4bit_multi_linear_fused
    from adapter_doctor.runtime.eligibility import lora_parts, packed_4bit
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    result: dict = {"tokens": tokens, "in": inp, "out": out}
    weight = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) * 0.02
    for nested in (False, True):
        data, state = bnb.functional.quantize_4bit(weight, compress_statistics=nested, quant_type="nf4")
        packed = packed_4bit(types.SimpleNamespace(data=data, quant_state=state))
        key = "nested" if nested else "plain"
        result[f"dequant_ms_bnb_{key}"] = cuda_ms(lambda d=data, s=state: bnb.functional.dequantize_4bit(d, s))
        result[f"dequant_ms_ours_{key}"] = cuda_ms(lambda p=packed: dequantize_4bit_triton(p, torch.bfloat16))
    x = torch.randn(tokens, inp, device="cuda", dtype=torch.bfloat16)
    result["bf16_gemm_ms"] = cuda_ms(lambda: x @ weight.T)
    holder = nn.Module()
    holder.proj = bnb.nn.Linear4bit(inp, out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    holder.proj.load_state_dict({"weight": weight})
    holder.proj.cuda()
    layer = get_peft_model(holder, LoraConfig(r=16, target_modules=["proj"])).base_model.model.proj
    parts = lora_parts(layer)
    xg = x.clone().requires_grad_()
    dy = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)
    result["lora_fwd_bwd_ms_peft_bnb"] = cuda_ms(lambda: layer(xg).backward(dy))
    result["lora_fwd_bwd_ms_ours"] = cuda_ms(lambda: lora4bit_multi_linear_fused(xg, [parts])[0].backward(dy))
    return result


def main() -> None:  # noqa: PLR0915 - one timed run, top to bottom
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="8b")
    parser.add_argument("--write-checkpoint", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-gib", type=float, help="cap this process's GPU memory (a smaller card)")
    parser.add_argument("--profile-memory", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also profile two steps' GPU time")
    parser.add_argument("--as-loaded", action="store_true", help="no model.train(): from_pretrained's eval mode")
    parser.add_argument("--time-kernels", action="store_true")
    parser.add_argument("--reserved", action="store_true",
                        help="also report the reserved memory after the timed steps by stream and pool")
    args = parser.parse_args()
    if args.time_kernels:
        emit(time_kernels())
        return
    if args.write_checkpoint:
        write_base(args.size, args.write_checkpoint)
        return
    if args.variant.startswith("unsloth"):  # before anything imports transformers
        import unsloth  # noqa: F401
    import torch

    cap_memory(args.memory_gib)
    started = time.perf_counter()
    report = None
    if args.variant.startswith("unsloth"):
        model = unsloth_model(args.checkpoint, load_in_4bit=True, max_seq_length=args.seq,
                              checkpointing=args.variant == "unsloth")
        memory: dict = {}
    else:
        model, memory = load(args.checkpoint, args.variant)
    layers = model.base_model.model.model.layers
    if args.variant.startswith("ours"):
        from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched

        patched = ensure_patched(model)
        report = {"kernels": patched.kernels, "fallbacks": len(patched.fallbacks),
                  "fallback_reasons": sorted({f.reason for f in patched.fallbacks})}
        if "offload" in args.variant:
            enable_offloaded_checkpointing(model, every_n_layers=2 if args.variant.endswith("-half") else 1,
                                           cuda_graphs=args.variant.endswith("-graphs"))
    if not args.as_loaded:
        model.train()
    dtypes: dict[str, str] = {}

    def note_dtype(module, args, kwargs) -> None:  # the residual stream's dtype, as the first layer gets it
        dtypes.setdefault("layer_input", str((args[0] if args else kwargs["hidden_states"]).dtype))
        hook.remove()

    hook = layers[0].register_forward_pre_hook(note_dtype, with_kwargs=True)
    step = training_step(model)
    config = model.config
    ids = torch.randint(4, config.vocab_size, (args.bs, args.seq), device="cuda")
    # --warmup 0 --steps 1 runs one step in all (a long-context try): the first step is then the timed one.
    result = timed(step, [ids] * args.warmup, [ids] * args.steps, args.steps * args.bs * args.seq)
    result = {
        "size": args.size, "variant": args.variant, "seq": args.seq, "bs": args.bs, **result,
        "mfu": round(result["tok_s"] * flops_per_token(config, args.seq) / H200_BF16_PEAK, 4),
        **memory, "parameters_gib": parameter_bytes(model), **dtypes, "training": model.training, "patch": report,
        "device": torch.cuda.get_device_name(), **versions(), "pid": os.getpid(),
        "process_s": round(time.perf_counter() - started, 1),
    }
    if "offload" in args.variant:
        result["host_plan"] = host_plan_gib(model)
    if args.reserved:
        result["reserved_by_pool"] = reserved_by_pool()
    if args.profile:
        result["profile"] = kernel_profile(step, ids)
    if args.profile_memory:
        torch.cuda.memory._record_memory_history(max_entries=200000)
        step(ids)
        torch.cuda.synchronize()
        result["live_at_peak"] = live_at_peak(torch.cuda.memory._snapshot())
        torch.cuda.memory._record_memory_history(enabled=None)
    emit(result)


if __name__ == "__main__":
    main()
