"""What the training benchmarks share: the model shapes, the base checkpoint on disk, the Unsloth loader, the
timed step loop and the kernel-time profile.

Every benchmark process times one configuration; bench/compare.py starts them one after another.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

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
# Other architectures of the runtime's spec table, at real shapes: (model_type, config fields).
OTHER_SHAPES = {
    "gemma3-4b": ("gemma3_text", dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                                      sliding_window=1024)),  # Gemma 3 4B's text model
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936,
                               tie_word_embeddings=False)),  # Qwen3-8B: q/k norms before RoPE
    "phi3-mini": ("phi3", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, vocab_size=32064)),  # Phi-3-mini: fused qkv and gate_up
    "gemma3-tiny": ("gemma3_text", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024,
                                        sliding_window=64)),
    "phi3-tiny": ("phi3", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, vocab_size=1024, pad_token_id=0)),
}
SIZES = sorted([*SHAPES, *OTHER_SHAPES])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # Phi-3's names for the same seven
H200_BF16_PEAK = 989.4e12  # dense bf16 tensor-core peak, datasheet (the same as H100 SXM)


def version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    import torch

    return {"torch": torch.__version__, **{d: version(d) for d in
            ("transformers", "peft", "triton", "bitsandbytes", "liger-kernel", "unsloth")}}


def cap_memory(budget_gib: float | None) -> None:
    """Limit this process's GPU memory to `budget_gib`, so that the H200 behaves as a smaller card would."""
    import torch

    if budget_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2**30 / total))


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def llama_config(size: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=131072, rope_theta=500000.0,
                       **{"vocab_size": 128256, **SHAPES[size]})


def model_config(size: str) -> Any:
    """The config of `size`: a Llama shape, or one of OTHER_SHAPES."""
    if size not in OTHER_SHAPES:
        return llama_config(size)
    from transformers import AutoConfig

    model_type, fields = OTHER_SHAPES[size]
    return AutoConfig.for_model(model_type, max_position_embeddings=131072, **fields)


def apply_liger(model_type: str) -> None:
    """Liger-Kernel's RoPE, RMSNorm, SwiGLU/GeGLU and fused linear cross-entropy (its defaults) for
    `model_type`: it patches transformers' classes for the rest of the process, so call it before building."""
    import liger_kernel.transformers as liger

    getattr(liger, f"apply_liger_kernel_to_{model_type}")()


def targets(config: Any) -> list[str]:
    """LoRA on every linear projection of a layer, by the architecture's names."""
    return FUSED_TARGETS if config.model_type == "phi3" else TARGETS


def flops_per_token(config, seq: int) -> float:
    """4N (frozen base: no weight gradients, N the projections and the head) + causal attention; recompute not
    counted."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    n = layers * (2 * h * q + 2 * h * kv + 3 * h * i) + config.vocab_size * h
    return 4 * n + 4 * layers * seq * h


def write_base(size: str, path: Path) -> None:
    """A random-initialised bf16 model of `size` (seed 0) with a word-level tokenizer beside it: everything
    `from_pretrained` and Unsloth's `FastLanguageModel.from_pretrained` need, offline. Written once."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if (path / "config.json").exists():
        return
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 1024)}}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>", model_max_length=1 << 20).save_pretrained(path)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(model_config(size), dtype=torch.bfloat16)
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 1, 2
    model.save_pretrained(path)


def unsloth_model(path: Path, *, load_in_4bit: bool, max_seq_length: int, checkpointing: bool) -> Any:
    """Unsloth's own recipe: `FastLanguageModel` (nf4 with double quantization when 4-bit, bf16 compute), LoRA r16
    on the seven projections, its CPU-offloaded checkpointing ("unsloth") or none. Imports unsloth first, as
    it asks: call this before anything imports transformers."""
    import torch
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=max_seq_length, dtype=torch.bfloat16,
                                                 load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=targets(model.config),
                                             lora_dropout=0,
                                             bias="none", random_state=0,
                                             use_gradient_checkpointing="unsloth" if checkpointing else False)
    FastLanguageModel.for_training(model)
    return model


def training_step(model: Any, inputs: Callable[[Any], dict] | None = None) -> Callable[[Any], Any]:
    """One AdamW step (lr 1e-4, the trainable parameters) on a batch; `inputs(batch)` gives the forward's
    keyword arguments, by default a causal LM's on a tensor of token ids. Returns the loss."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = inputs or (lambda ids: {"input_ids": ids, "labels": ids})

    def step(batch: Any) -> Any:
        # The named ranges cost nothing unprofiled; kernel_profile splits the GPU's idle time by them.
        with torch.profiler.record_function("forward"):
            loss = model(**inputs(batch)).loss
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def host_plan_gib(model: Any) -> dict | None:
    """What offloaded checkpointing's host-memory plan did in the last step (sizes in GiB), or None."""
    import dataclasses

    from adapter_doctor.runtime import host_plan

    plan = host_plan(model)
    if plan is None:
        return None
    return {k: gib(v) if k in ("limit", "held", "peak") and v else v for k, v in dataclasses.asdict(plan).items()}


def reserved_by_pool() -> list[dict]:
    """The caching allocator's reserved memory now, by stream and pool (a CUDA graph's private pool, or the
    stream's own blocks): where `max_memory_reserved` above `max_memory_allocated` sits. A block is cached for
    the stream that allocated it, and only that stream's later requests reuse it."""
    import torch
    from adapter_doctor.runtime import checkpoint

    side = {s.cuda_stream for s in checkpoint._STREAMS.values()}
    sums: dict[tuple, list[int]] = {}
    for segment in torch.cuda.memory_snapshot():
        stream = segment["stream"]
        label = "compute" if stream == 0 else "offload copies" if stream in side else f"stream {stream:#x}"
        pool = "graphs" if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0) else "own"
        total = sums.setdefault((label, pool), [0, 0, 0])
        total[0] += segment["total_size"]
        total[1] += segment["allocated_size"]
        total[2] += 1
    return [{"stream": label, "pool": pool, "reserved_gib": gib(r), "allocated_gib": gib(a), "segments": n}
            for (label, pool), (r, a, n) in sorted(sums.items(), key=lambda kv: -kv[1][0])]


def timed(step: Callable[[Any], Any], warmup: Iterable[Any], batches: list[Any], real_tokens: int) -> dict:
    """Run `step` on the warm-up batches, then time it over `batches`: real (non-padding) tokens per second,
    seconds per step, the timed steps' peak memory and the last loss."""
    import torch

    cuda = torch.cuda.is_available()
    for batch in warmup:
        step(batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = None
    for batch in batches:
        loss = step(batch)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tok_s": round(real_tokens / seconds), "step_s": round(seconds / len(batches), 4),
            "peak_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else None,
            "loss": None if loss is None else round(float(loss.detach()), 4)}


def kernel_profile(step: Callable[[Any], Any], batch: Any, steps: int = 2, top: int = 20) -> dict:
    """Where a step's time goes: GPU kernel and copy time per step by kind, the top kernels, and on the host
    the operators with the most self time and the calls that wait for the GPU (a host that waits, or spends
    longer launching than the GPU computing, leaves the GPU idle), and the compute stream's idle time by phase
    and cause (`timeline.gaps`)."""
    import tempfile

    import torch
    from timeline import PHASES, gaps
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(batch)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    kinds: dict[str, float] = {}
    kernels, host = [], []
    for event in prof.key_averages():
        # Ranges (training_step's phases, torch's Optimizer.step#...): their device-side copy spans kernels, as
        # torch's own tables leave them out of device totals.
        if event.key in PHASES or getattr(event, "is_user_annotation", False):
            continue
        device_us = getattr(event, "self_device_time_total", 0)
        on_device = event.device_type != torch.autograd.DeviceType.CPU or not event.self_cpu_time_total
        if device_us and on_device:  # a kernel or a copy
            kernels.append((event.key, device_us / steps, event.count // steps))
            kinds[kind(event.key)] = kinds.get(kind(event.key), 0.0) + device_us / steps
        elif event.self_cpu_time_total:
            host.append((event.key, event.self_cpu_time_total / steps, event.count // steps))
    kernels.sort(key=lambda k: -k[1])
    host.sort(key=lambda k: -k[1])
    waits = [h for h in host if "Synchronize" in h[0] or h[0] in ("aten::item", "aten::_local_scalar_dense")]
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        idle = gaps(Path(tmp) / "trace.json", steps)
    return {"wall_ms": round(wall * 1e3, 1),
            "gpu_ms": {k: round(v / 1e3, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "gpu_busy_ms": round(sum(kinds.values()) / 1e3, 1), "top": _rows(kernels, top),
            "host_self_ms": round(sum(h[1] for h in host) / 1e3, 1), "host_top": _rows(host, top),
            "host_waits": _rows(waits, top), "gpu_idle": idle}


def _rows(found: list[tuple[str, float, int]], top: int) -> list[dict]:
    return [{"name": name[:90], "ms": round(us / 1e3, 2), "calls": calls} for name, us, calls in found[:top]]


def kind(name: str) -> str:
    lowered = name.lower()
    if "memcpy" in lowered or "memset" in lowered:
        return "copies (" + ("host" if "htod" in lowered or "dtoh" in lowered else "device") + ")"
    if any(k in lowered for k in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(k in lowered for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "wgmma")):
        return "gemm"
    if lowered.startswith("_") or "triton" in lowered:
        return "triton"
    return "other (elementwise, reductions)"


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)
