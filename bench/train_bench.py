"""One LoRA training configuration, timed in this process: prints one JSON line.

    python bench/train_bench.py --size 8b --variant ours --seq 2048 --bs 4 [--gc] [--steps 10] [--warmup 3]

Random-initialised Llama of a real shape (1b = Llama-3.2-1B, 3b = Llama-3.2-3B, 8b = Llama-3.1-8B; `tiny` for
a CPU smoke run), LoRA r=16 on all seven linear projections, bf16, SDPA attention, AdamW. Variants:
`hf` (HF + PEFT), `liger` (HF + PEFT with Liger-Kernel's RoPE, RMSNorm, SwiGLU and fused linear
cross-entropy, applied before the model is built), `ours` (HF + PEFT, then `ensure_patched`).
bench/compare.py runs each variant in its own process and prints them side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import time

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H100_BF16_PEAK = 989.4e12  # dense bf16 tensor-core peak, datasheet


def build(size: str, variant: str, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"vocab_size": 128256, **SHAPES[size]}
    config = LlamaConfig(max_position_embeddings=131072, rope_theta=500000.0, **shape)
    if variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    return model, config


def flops_per_token(model, config, seq: int) -> float:
    """4N + causal attention per token for a LoRA step (frozen base: no weight gradients); recompute not counted."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    if config.tie_word_embeddings:
        n += config.vocab_size * config.hidden_size
    attention = 2 * config.num_hidden_layers * seq * config.hidden_size  # QK^T and AV, causal half, fwd
    return 4 * n + 2 * attention


def version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), required=True)
    parser.add_argument("--variant", choices=["hf", "liger", "ours"], required=True)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--gc", action="store_true", help="non-reentrant gradient checkpointing")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = build(args.size, args.variant, device)
    patched = None
    if args.variant == "ours":
        from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched

        patched = ensure_patched(model).kernels
        if args.gc:  # ours checkpoints with the layer inputs offloaded to pinned host memory
            enable_offloaded_checkpointing(model)
    elif args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.bs, args.seq), device=device)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.bs * args.seq / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    print(json.dumps({
        "size": args.size, "variant": args.variant, "seq": args.seq, "bs": args.bs, "gc": args.gc,
        "kernels": patched, "tok_s": round(tokens), "step_s": round(seconds, 4),
        "peak_gib": None if peak is None else round(peak, 2),
        "mfu": round(tokens * flops_per_token(model, config, args.seq) / H100_BF16_PEAK, 4),
        "loss": round(float(loss), 4), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": version("transformers"), "peft": version("peft"),
        "liger_kernel": version("liger-kernel"), "pid": os.getpid(),
    }), flush=True)


if __name__ == "__main__":
    main()
