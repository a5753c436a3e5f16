"""LoRA training under DDP and FSDP2: tokens/s and peak memory per GPU, the loss curve, and the saved adapter.

    torchrun --standalone --nproc-per-node 2 bench/multigpu.py --size 8b --seq 2048 --bs 4 --gc on,off \\
        --engines ddp,fsdp2,fsdp2-accelerate --variants hf,ours --out bench/results/multigpu-2gpu.json
    torchrun --standalone --nproc-per-node 1 bench/multigpu.py ... --accumulate 2   # its single-GPU reference

One rank per GPU. Each (checkpointing, engine, variant) row is built, trained and timed in turn in the same
process group; `bench/compare.py --multigpu N` instead starts one launch per row (Liger patches transformers'
classes for the rest of its process, so it must have its own) and puts the runs on N GPUs and on one side by side.
Models and variants are those of train_bench.py (random-initialised Llama shapes, LoRA r=16 on all seven
projections, bf16, SDPA, AdamW): `hf`, `liger` (HF + PEFT with Liger's kernels) and `ours`. `--gc on` is
non-reentrant checkpointing for `hf` and `liger`, offloaded checkpointing for `ours`. Engines:
- `ddp`: DistributedDataParallel (find_unused_parameters as --find-unused says; the Trainer turns it on for a
  PeftModel);
- `fsdp2`: `fully_shard` on every decoder layer, then the root (TRL's and torchtitan's layout);
- `fsdp2-accelerate`: the layout accelerate's FSDP2 plugin builds: the layers, the embedding, [final norm,
  lm_head] as one unit that stays unsharded after its forward, then the root.
The patch, and checkpointing, go on before the engine wraps the model, as TRL's trainers do it.

Data: 16 fixed random sequences (seed 0); step s trains on the global batch of rows s*G, s*G+1, ... (mod 16),
G = world x accumulate x bs, and rank r on its r-th share of it. `--accumulate k` splits each rank's share into k
micro-batches whose gradients add up before the step, so one GPU with `--accumulate 2` takes the steps two
ranks take: its `losses` (each step's mean over the global batch, warm-up steps included) are the curve the
2-GPU run must follow. `tok_s` counts every rank's tokens. `--check-save DIR`: after training, rank 0 saves the
adapter (under FSDP2 from a full state dict gathered on every rank), reloads it into a fresh unpatched base with
vanilla `PeftModel.from_pretrained`, and compares its logits with those of the same base given the trained LoRA
tensors directly. Rank 0 prints one JSON line per row and writes them all to --out. Without CUDA it runs on the
CPU over gloo (use --size tiny), to check the script itself.
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
from harness import SIZES, version  # noqa: E402 - the sibling scripts, for the same models
from train_bench import base_model, build, ready  # noqa: E402

DATASET = 16  # fixed sequences the curve trains on

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

    model, kernels = ready(build(args.size, variant, device.type), variant, gc_on)
    if engine == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=args.find_unused), model, kernels
    shard(model, engine)
    return model, model, kernels


def dataset(args, vocab: int):
    import torch

    return torch.randint(4, vocab, (DATASET, args.seq), generator=torch.Generator().manual_seed(0))


def micro_batches(data, step: int, rank: int, world: int, args) -> list:
    """This rank's micro-batches of the global batch of `step`."""
    per_rank = args.accumulate * args.bs
    start = step * world * per_rank + rank * per_rank
    rows = [(start + i) % DATASET for i in range(per_rank)]
    return [data[rows[m * args.bs:(m + 1) * args.bs]] for m in range(args.accumulate)]


def measure(args, engine: str, variant: str, gc_on: bool, device, rank: int, world: int) -> dict:
    import contextlib

    import torch
    import torch.distributed as dist

    wrapped, model, kernels = prepare(args, engine, variant, gc_on, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    data = dataset(args, model.config.vocab_size)
    losses: list = []

    def step(index: int) -> None:
        total = torch.zeros((), device=device)
        batches = micro_batches(data, index, rank, world, args)
        for m, batch in enumerate(batches):
            ids = batch.to(device)
            last = m == len(batches) - 1
            # DDP all-reduces on the last micro-batch only, as Trainer's accumulation does
            quiet = wrapped.no_sync() if engine == "ddp" and not last else contextlib.nullcontext()
            with quiet:
                loss = wrapped(input_ids=ids, labels=ids).loss / len(batches)
                loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)

    for index in range(args.warmup):
        step(index)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for index in range(args.warmup, args.warmup + args.steps):
        step(index)
    sync()
    seconds = torch.tensor((time.perf_counter() - start) / args.steps, device=device)
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
                        device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends it
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    curve = torch.stack(losses).float()
    dist.all_reduce(curve)
    tokens = args.accumulate * args.bs * args.seq  # per rank and step
    result = {
        "engine": engine, "variant": variant, "world": world, "accumulate": args.accumulate, "size": args.size,
        "seq": args.seq, "bs": args.bs, "gc": gc_on, "find_unused": args.find_unused if engine == "ddp" else None,
        "kernels": kernels, "tok_s": round(world * tokens / float(seconds)),
        "tok_s_per_gpu": round(tokens / float(seconds)), "step_s": round(float(seconds), 4),
        "peak_gib": round(float(peak), 2) if device.type == "cuda" else None,
        "losses": [round(v, 5) for v in (curve / world).tolist()],
    }
    if args.check_save is not None:
        result["save"] = check_save(args, f"{engine}-{variant}-gc-{'on' if gc_on else 'off'}", engine, model, device,
                                    rank)
    return result


def check_save(args, name: str, engine: str, model, device, rank: int) -> dict | None:
    """Rank 0 saves the trained adapter; vanilla PEFT reloads it into a fresh base, and its logits must equal
    those of the same base given the trained LoRA tensors directly."""
    import torch
    import torch.distributed as dist
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    full = None
    if engine != "ddp":  # every rank takes part in the gather
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        dist.barrier()
        return None
    state = full if full is not None else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    lora = {k: v for k, v in state.items() if "lora_" in k}
    folder = args.check_save / name
    if "-ours-" in name:
        from adapter_doctor.runtime import save_adapter

        save_adapter(model, folder, state_dict=lora if full is not None else None)
    else:
        model.save_pretrained(folder, state_dict=lora if full is not None else None)
    probe = dataset(args, model.config.vocab_size)[:1, :256].to(device)
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(base_model(args.size, device.type), folder).eval()
        got = reloaded(input_ids=probe).logits.float()
        del reloaded
        direct = get_peft_model(base_model(args.size, device.type), model.peft_config["default"]).eval()
        unexpected = set_peft_model_state_dict(direct, {k.replace(".default", ""): v for k, v in lora.items()})
        want = direct(input_ids=probe).logits.float()
    dist.barrier()
    return {"folder": str(folder), "lora_tensors": len(lora), "identical": bool(torch.equal(got, want)),
            "max_abs_diff": float((got - want).abs().max()),
            "unexpected_keys": len(getattr(unexpected, "unexpected_keys", []))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, required=True)
    parser.add_argument("--engines", default="ddp,fsdp2", help="comma-separated: ddp, fsdp2, fsdp2-accelerate")
    parser.add_argument("--variants", default="hf,ours", help="comma-separated: hf, liger, ours")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4, help="rows per GPU")
    parser.add_argument("--gc", default="off", help="comma-separated: off, on (non-reentrant for hf, offloaded for "
                        "ours)")
    parser.add_argument("--find-unused", action="store_true", help="DDP's find_unused_parameters")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per rank and step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--check-save", type=Path, metavar="DIR", help="save from rank 0 and reload in vanilla PEFT")
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
