"""Packed batches on the GPU: bf16 numerics against the per-document truth, and the document-attention backends.

    python bench/packing_attention.py [--out packing-attention.json] [--tokens 16384] [--iters 10]
    python bench/packing_attention.py --cpu     # smoke run: tiny shapes, the mask path only

1. Numerics. Small random-initialised models of every architecture in the spec table (hidden 256, 4 query and 2
   kv heads of 64, 2 layers), bf16 base with PEFT's fp32 LoRA (r=8 on every linear layer), patched with the
   Triton kernels. One packed row (transformers' DataCollatorWithFlattening: position_ids that restart, each
   document's first label -100) against the same patched model run on each document alone (token-weighted mean
   loss), and against plain HF + PEFT on the packed row with its default cache (documents attend to each other).
   Reported: the loss of each, and the relative norm of the LoRA-gradient difference from the truth.
2. Timing. Llama-3.1-8B attention shape (32 query and 8 kv heads of 128), bf16, one packed row of --tokens
   tokens cut into SFT-like documents (log-normal lengths, median 300, sigma 1.0, capped at 4,096, seed 0).
   Forward + backward of attention alone, CUDA events, median of --iters after 3 warm-ups, for each backend of
   `runtime/document_attention.py` ("varlen": torch's varlen_attn; "flex": FlexAttention with a document block
   mask, compiled; "mask": SDPA with a dense boolean document mask), and plain causal SDPA over the whole row
   (which ignores the documents) for scale. The flex time includes building the block mask once per step.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 64}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 64}),
    "gemma": ("GemmaConfig", {"head_dim": 64, "hidden_act": "gelu_pytorch_tanh"}),
    "gemma2": ("Gemma2Config", {"head_dim": 64, "sliding_window": 64, "query_pre_attn_scalar": 64,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 64,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {"sliding_window": 64, "partial_rotary_factor": 0.5, "pad_token_id": 0,
                            "eos_token_id": 2}),
}
SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]


def build(arch: str, device: str, dtype: Any, attn: str) -> Any:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    name, extra = ARCHS[arch]
    config = getattr(transformers, name)(**{**SIZES, **extra})
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(device, dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))
    return model.train()


def grads_of(model: Any) -> dict[str, Any]:
    out = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def rel_norm(a: dict[str, Any], b: dict[str, Any]) -> float:
    num = math.sqrt(sum(float((a[n] - b[n]).norm()) ** 2 for n in b))
    return num / max(math.sqrt(sum(float(b[n].norm()) ** 2 for n in b)), 1e-30)


def numerics(device: str, lengths: list[int], archs: Any) -> list[dict[str, Any]]:
    import torch
    from adapter_doctor.runtime import document_attention, ensure_patched
    from transformers import DataCollatorWithFlattening

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(5)
    docs = [torch.randint(3, 1000, (n,), generator=generator) for n in lengths]
    batch = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
    batch = {k: v.to(device) for k, v in batch.items()}
    used: list[str] = []
    for name in ("by_varlen", "by_flex", "by_mask"):  # record which backend each layer ran
        original = getattr(document_attention, name)

        def counted(*args: Any, _f: Any = original, _n: str = name, **kwargs: Any) -> Any:
            out = _f(*args, **kwargs)
            if out is not None:
                used.append(_n.removeprefix("by_"))
            return out
        setattr(document_attention, name, counted)
    rows = []
    for arch in archs:
        attn = "eager" if arch == "gemma2" else "sdpa"
        row: dict[str, Any] = {"arch": arch, "attn": attn, "lengths": lengths}
        try:
            model = build(arch, device, dtype, attn)
            hf_loss = model(**batch).loss  # plain HF + PEFT, default use_cache
            hf_loss.backward()
            hf = grads_of(model)
            report = ensure_patched(model)
            row["kernels"] = report.kernels
            total = 0.0
            for d in docs:
                total = total + model(input_ids=d[None].to(device), labels=d[None].to(device)).loss * (len(d) - 1)
            truth_loss = total / sum(len(d) - 1 for d in docs)
            truth_loss.backward()
            truth = grads_of(model)
            used.clear()
            packed_loss = model(**batch).loss
            packed_loss.backward()
            packed = grads_of(model)
            row.update(truth_loss=float(truth_loss), packed_loss=float(packed_loss), hf_default_loss=float(hf_loss),
                       packed_loss_rel=abs(float(packed_loss) / float(truth_loss) - 1),
                       packed_grad_rel_norm=rel_norm(packed, truth), hf_default_grad_rel_norm=rel_norm(hf, truth),
                       backends=sorted(set(used)))
        except Exception as exc:  # noqa: BLE001 - one architecture's failure is a row, not the end of the run
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        rows.append(row)
    return rows


def sft_lengths(total: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < total:
        out.append(max(8, min(4096, round(math.exp(rng.gauss(math.log(300), 1.0))))))
    out[-1] -= sum(out) - total
    if out[-1] < 1:
        out.pop()
        out[-1] += total - sum(out)
    return out


def time_fn(fn: Any, iters: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timing(tokens: int, iters: int) -> dict[str, Any]:
    import torch
    from adapter_doctor.runtime import document_attention as da

    lengths = sft_lengths(tokens)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    max_len = max(lengths)
    heads, kv_heads, dim = 32, 8, 128
    scale = dim ** -0.5
    generator = torch.Generator(device="cuda").manual_seed(0)

    def leaves() -> tuple[Any, Any, Any]:
        return tuple(torch.randn(1, h, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
                     .requires_grad_() for h in (heads, kv_heads, kv_heads))

    q, k, v = leaves()
    grad = torch.randn(1, tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal, training = heads // kv_heads, True, True

    module = Module()

    def run(backend: str) -> Any:
        if backend == "causal_sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                   enable_gqa=True).transpose(1, 2)
        else:
            out, _ = da.attend(module, q, k, v, cu, max_len, implementation="sdpa", eager=None, scaling=scale,
                               dropout=0.0, window=None, softcap=None, kwargs={}, backend=backend)
        return out

    result: dict[str, Any] = {"shape": {"tokens": tokens, "q_heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                                        "documents": len(lengths), "max_length": max_len,
                                        "median_length": statistics.median(lengths)}, "ms": {}, "max_abs_diff": {}}
    reference = None
    for backend in ("mask", "varlen", "flex", "causal_sdpa"):
        try:
            if backend == "varlen" and da.by_varlen(q, k, v, cu, max_len, scaling=scale, window=None) is None:
                raise RuntimeError("varlen_attn unavailable in this torch")
            out = run(backend)
            (dq, dk, dv) = torch.autograd.grad(out, (q, k, v), grad)
            if backend == "mask":
                reference = (out.detach().float(), dq.float())
            elif backend != "causal_sdpa" and reference is not None:
                result["max_abs_diff"][backend] = {"out": float((out.float() - reference[0]).abs().max()),
                                                   "dq": float((dq.float() - reference[1]).abs().max())}

            def step(b: str = backend) -> None:
                o = run(b)
                torch.autograd.grad(o, (q, k, v), grad)
            torch.cuda.reset_peak_memory_stats()
            result["ms"][backend] = round(time_fn(step, iters), 3)
            result.setdefault("peak_mib", {})[backend] = round(torch.cuda.max_memory_allocated() / 2**20)
        except Exception as exc:  # noqa: BLE001 - a backend this torch lacks is a row saying so
            result["ms"][backend] = f"{type(exc).__name__}: {exc}"[:300]
    # the flex block mask's own cost per step (built once, shared by every layer)
    try:
        da._BLOCK_MASKS.clear()
        fresh = cu.clone()
        result["ms"]["flex_block_mask_build"] = round(time_fn(
            lambda: da._build_block_mask(fresh, 1, tokens, None), iters), 3)
    except Exception as exc:  # noqa: BLE001
        result["ms"]["flex_block_mask_build"] = f"{type(exc).__name__}: {exc}"[:300]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("packing-attention.json"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--archs", default=",".join(ARCHS))
    args = parser.parse_args()
    import platform
    import time

    import torch
    import transformers

    device = "cpu" if args.cpu else "cuda"
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "numerics_dtype": "bf16 base, fp32 LoRA" if device == "cuda" else "fp32",
    }
    archs = args.archs.split(",")
    report["numerics"] = numerics(device, [50, 30, 48], archs)
    if not args.cpu:  # longer documents, where a window (64) is shorter than a document; gemma2 (flex) once only
        report["numerics"] += numerics(device, [300, 700, 24, 1000], [a for a in archs if a != "gemma2"])
    if not (args.cpu or args.skip_timing):
        report["timing"] = timing(args.tokens, args.iters)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
