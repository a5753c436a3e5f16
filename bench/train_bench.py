"""One LoRA training configuration, timed in this process: prints one JSON line.

    python bench/train_bench.py --size 8b --variant ours --seq 2048 --bs 4 [--gc] [--steps 10] [--warmup 3]
    python bench/train_bench.py --size 8b --variant unsloth --checkpoint DIR --gc   # DIR: harness.write_base
    ... --profile    # also where the GPU time of a step goes (harness.kernel_profile)

Random-initialised Llama of a real shape (harness.SHAPES: 1b = Llama-3.2-1B, 3b = Llama-3.2-3B, 8b =
Llama-3.1-8B; `tiny` for a CPU smoke run), or another architecture of the spec table (harness.OTHER_SHAPES:
gemma3-4b, qwen3-8b, phi3-mini with its fused projections, and the -tiny ones), LoRA r=16 on all seven linear
(Phi-3's four fused ones), bf16, SDPA attention, AdamW. Variants: `hf` (HF + PEFT), `liger` (HF + PEFT with Liger-Kernel's RoPE, RMSNorm, SwiGLU and fused
linear cross-entropy, applied before the model is built), `ours` (HF + PEFT, then `ensure_patched`),
`unsloth` (`FastLanguageModel` on the checkpoint, its own checkpointing with --gc). bench/compare.py runs each
variant in its own process and prints them side by side.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    H200_BF16_PEAK,
    SIZES,
    apply_liger,
    cap_memory,
    emit,
    flops_per_token,
    host_plan_gib,
    kernel_profile,
    model_config,
    reserved_by_pool,
    targets,
    timed,
    training_step,
    unsloth_model,
    versions,
)

VARIANTS = ["hf", "liger", "ours", "unsloth"]


def base_model(size: str, device: str):
    """The random-initialised bf16 base of `size` (seed 0: every call builds the same weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(size), dtype=torch.bfloat16, attn_implementation="sdpa")


def build(size: str, variant: str, device: str):
    from peft import LoraConfig, get_peft_model

    config = model_config(size)
    if variant == "liger":
        apply_liger(config.model_type)
    return get_peft_model(base_model(size, device), LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                               target_modules=targets(config), task_type="CAUSAL_LM"))


def prepare(variant: str, size: str, gc: bool, device: str, checkpoint: Path | None, max_seq: int):
    """The variant's model, ready to train, and what `ensure_patched` reported (ours only)."""
    if variant == "unsloth":
        if checkpoint is None:
            raise SystemExit("--variant unsloth loads a checkpoint from disk: give --checkpoint")
        return unsloth_model(checkpoint, load_in_4bit=False, max_seq_length=max_seq, checkpointing=gc), None
    return ready(build(size, variant, device), variant, gc)


def ready(model, variant: str, gc: bool):
    """(`model` patched for `ours`, checkpointed as each variant's users do with `gc`, in training mode; the
    patch's kernel set or None)."""
    patched = None
    if variant == "ours":
        from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched

        patched = ensure_patched(model).kernels
        if gc:  # ours checkpoints with the layer inputs offloaded to pinned host memory
            enable_offloaded_checkpointing(model)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    return model, patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--checkpoint", type=Path, help="the base on disk (needed by unsloth)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing (ours and unsloth: offloaded)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-gib", type=float, help="cap this process's GPU memory (a smaller card)")
    parser.add_argument("--profile", action="store_true", help="also profile two steps' GPU time")
    parser.add_argument("--reserved", action="store_true",
                        help="also report the reserved memory after the timed steps by stream and pool")
    args = parser.parse_args()
    if args.variant == "unsloth":  # before anything imports transformers
        import unsloth  # noqa: F401
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cap_memory(args.memory_gib)
    model, patched = prepare(args.variant, args.size, args.gc, device, args.checkpoint, args.seq)
    step = training_step(model)
    ids = torch.randint(4, model.config.vocab_size, (args.bs, args.seq), device=device)
    result = timed(step, [ids] * args.warmup, [ids] * args.steps, args.steps * args.bs * args.seq)
    result = {"size": args.size, "variant": args.variant, "seq": args.seq, "bs": args.bs, "gc": args.gc,
              "kernels": patched, **result,
              "mfu": round(result["tok_s"] * flops_per_token(model.config, args.seq) / H200_BF16_PEAK, 4),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", **versions(),
              "pid": os.getpid()}
    if args.variant == "ours" and args.gc:  # what the host-memory plan did with the layers' saved tensors
        result["host_plan"] = host_plan_gib(model)
    if args.reserved and device == "cuda":
        result["reserved_by_pool"] = reserved_by_pool()
    if args.profile and device == "cuda":
        result["profile"] = kernel_profile(step, ids)
    emit(result)


if __name__ == "__main__":
    main()
