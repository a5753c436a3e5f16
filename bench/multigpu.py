"""LoRA training under DDP and FSDP2, HF + PEFT against ours, side by side: tokens/s and peak memory per GPU.

    torchrun --standalone --nproc-per-node 2 bench/multigpu.py --size 8b --seq 2048 --bs 4 --gc on,off \\
        --engines ddp,fsdp2,fsdp2-accelerate --variants hf,ours --out bench/results/multigpu-2gpu.json

Run it with --nproc-per-node 1 and 2 (or more): the scaling is the ratio of the `tok_s` of the same row. Each
(checkpointing, engine, variant) is built, warmed up and timed in turn in the same process group; one rank per
GPU.
Models and variants are those of train_bench.py (random-initialised Llama shapes, LoRA r=16 on all seven
projections, bf16, SDPA, AdamW). `--gc on` is non-reentrant checkpointing for `hf` and offloaded checkpointing
for `ours`. Engines:
- `ddp`: DistributedDataParallel (find_unused_parameters as --find-unused says; the Trainer turns it on for a
  PeftModel);
- `fsdp2`: `fully_shard` on every decoder layer, then the root (TRL's and torchtitan's layout);
- `fsdp2-accelerate`: the layout accelerate's FSDP2 plugin builds: the layers, the embedding, [final norm,
  lm_head] as one unit that stays unsharded after its forward, then the root.
The patch, and checkpointing, go on before the engine wraps the model, as TRL's trainers do it. Every rank
feeds its own random tokens; `tok_s` counts all ranks' tokens. Rank 0 prints one JSON line per row and writes
them all to --out. Without CUDA it runs on the CPU over gloo (use --size tiny), to check the script itself.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SHAPES, version  # noqa: E402 - the sibling scripts, for the same models
from train_bench import build  # noqa: E402

# NVLink multicast can take a host's shared GPUs out of service: keep it off whatever the caller's environment
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def shard(model, layout: str) -> None:
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model()
    for layer in inner.model.layers:
        fully_shard(layer)
    if layout == "fsdp2-accelerate":
        embed, head = inner.get_input_embeddings(), inner.get_output_embeddings()
        if head.weight is embed.weight:  # tied: accelerate keeps both in the tail unit
            fully_shard([inner.model.norm, embed, head], reshard_after_forward=False)
        else:
            fully_shard(embed)
            fully_shard([inner.model.norm, head], reshard_after_forward=False)
    fully_shard(model)


def prepare(args, engine: str, variant: str, gc_on: bool, device):
    """(the model to call, the PeftModel, its patch report's kernel set or None)."""
    from torch.nn.parallel import DistributedDataParallel

    model = build(args.size, variant, device.type)
    config = model.config
    kernels = None
    if variant == "ours":
        from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched

        kernels = ensure_patched(model).kernels
        if gc_on:
            enable_offloaded_checkpointing(model)
    elif gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    if engine == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=args.find_unused), model, \
            config, kernels
    shard(model, engine)
    return model, model, config, kernels


def measure(args, engine: str, variant: str, gc_on: bool, device, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    wrapped, model, config, kernels = prepare(args, engine, variant, gc_on, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, config.vocab_size, (args.bs, args.seq), generator=generator).to(device)
    losses = []

    def step() -> None:
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = torch.tensor((time.perf_counter() - start) / args.steps, device=device)
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
                        device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends it
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    first = torch.stack([losses[0]]).float()
    dist.all_reduce(first)
    result = {
        "engine": engine, "variant": variant, "world": world, "size": args.size, "seq": args.seq, "bs": args.bs,
        "gc": gc_on, "find_unused": args.find_unused if engine == "ddp" else None, "kernels": kernels,
        "tok_s": round(world * args.bs * args.seq / float(seconds)),
        "tok_s_per_gpu": round(args.bs * args.seq / float(seconds)), "step_s": round(float(seconds), 4),
        "peak_gib": round(float(peak), 2) if device.type == "cuda" else None,
        "first_loss": round(float(first) / world, 5), "last_loss": round(float(losses[-1]), 4),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), required=True)
    parser.add_argument("--engines", default="ddp,fsdp2", help="comma-separated: ddp, fsdp2, fsdp2-accelerate")
    parser.add_argument("--variants", default="hf,ours", help="comma-separated: hf, ours")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4, help="rows per GPU")
    parser.add_argument("--gc", default="off", help="comma-separated: off, on (non-reentrant for hf, offloaded for "
                        "ours)")
    parser.add_argument("--find-unused", action="store_true", help="DDP's find_unused_parameters")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    results = []
    rows = [(gc_on == "on", engine, variant) for gc_on in args.gc.split(",") for engine in args.engines.split(",")
            for variant in args.variants.split(",")]
    for gc_on, engine, variant in rows:
        try:
            results.append(measure(args, engine, variant, gc_on, device, rank, world))
        except Exception as error:  # noqa: BLE001 - the same code fails alike on every rank: record, go on
            results.append({"engine": engine, "variant": variant, "gc": gc_on, "world": world,
                            "error": f"{type(error).__name__}: {error}"[:2000]})
        gc.collect()  # the last row's model and optimizer, before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            print(json.dumps(results[-1]), flush=True)
    if rank == 0 and args.out is not None:
        meta = {"world": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "backend": dist.get_backend(), "torch": torch.__version__, "transformers": version("transformers"),
                "peft": version("peft"), "accelerate": version("accelerate"),
                "adapter_doctor": version("adapter-doctor"), "argv": sys.argv[1:]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
