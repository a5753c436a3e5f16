"""values: what the tensors hold: empty ZeRO-3 shards, NaN/Inf, an all-zero lora_B, fp32 bulk."""
from __future__ import annotations

from typing import Iterator

from ..finding import Finding, Severity
from ..tensor_data import TensorDataError, scan_values
from . import Check, Context, register, runner
from .weights import data_finding

CAT = "values"
EMPTY = Check(
    "ADC701", CAT, Severity.ERROR, "Zero-size tensors (ungathered ZeRO-3 / FSDP save)",
    "DeepSpeed ZeRO-3 and FSDP shard parameters across ranks. Saving without gathering them writes empty tensors "
    "(shape [0]); loading then fails with `size mismatch ... torch.Size([0])`, and there is nothing to recover "
    "from the file.",
    manual="Re-save with stage3_gather_16bit_weights_on_model_save=true (ZeRO-3) or a full state dict (FSDP).")
NONFINITE = Check(
    "ADC702", CAT, Severity.ERROR, "NaN or Inf in the weights",
    "A NaN or Inf in any LoRA tensor makes every output of the adapted layers NaN. Training diverged before the save.",
    manual="Use an earlier checkpoint, or retrain with a lower learning rate / gradient clipping.")
ZERO_B = Check(
    "ADC703", CAT, Severity.WARNING, "lora_B is all zeros: the adapter does nothing",
    "PEFT initialises lora_B to zero, so an adapter whose lora_B tensors are still zero changes no output. It was "
    "saved before any training step, or its weights never received gradients.",
    manual="Check that training ran and that the LoRA parameters were trainable.")
FP32 = Check(
    "ADC704", CAT, Severity.INFO, "Stored in fp32",
    "The adapter is stored in fp32. bf16 halves the file and is what mixed-precision training computes in; PEFT "
    "upcasts adapter weights to fp32 on load anyway.", fixer="cast-dtype",
    manual="doctor fix --only ADC704 --dtype bf16")  # the cast is opt-in: the hint names the dtype
register(EMPTY, NONFINITE, ZERO_B, FP32)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} KB"


@runner
def check(ctx: Context) -> Iterator[Finding]:
    primary = ctx.artifact.primary_weights
    tensors = ctx.artifact.tensors
    if primary is None or not tensors or ctx.not_peft:
        return
    where = str(primary.path)
    empty = [n for n, t in tensors.items() if t.numel == 0]
    if empty:
        share = "all" if len(empty) == len(tensors) else f"{len(empty)} of {len(tensors)}"
        yield EMPTY.finding(f"{share} tensors are empty, e.g. {empty[0]} with shape {list(tensors[empty[0]].shape)}",
                            f"{where}#{empty[0]}")
    fp32 = sum(t.numel * 4 for t in tensors.values() if t.dtype == "F32")
    if fp32 and fp32 == sum(t.numel * 4 for t in tensors.values() if t.dtype in ("F32", "F16", "BF16")):
        yield FP32.finding(f"{_mb(fp32)} of fp32 tensors; bf16 would be {_mb(fp32 // 2)}", where)
    if ctx.scan_values and len(empty) < len(tensors):
        yield from _scan(ctx, primary, where)


def _scan(ctx: Context, primary, where: str) -> Iterator[Finding]:
    try:
        stats = scan_values(primary)
    except TensorDataError as exc:
        yield data_finding(primary, exc)
        return
    bad = [n for n, s in stats.items() if s.nonfinite]
    if bad:
        yield NONFINITE.finding(f"{len(bad)} tensor(s) hold NaN or Inf, e.g. {bad[0]}", f"{where}#{bad[0]}")
    keys = ctx.artifact.keys
    b_names = [n for n in stats if keys[n].role in ("lora_B", "lora_embedding_B") and ctx.artifact.tensors[n].numel]
    zero = [n for n in b_names if stats[n].all_zero]
    if b_names and len(zero) == len(b_names):
        yield ZERO_B.finding(f"all {len(b_names)} lora_B tensors are exactly zero", where)
    elif zero:
        yield ZERO_B.finding(f"{len(zero)} of {len(b_names)} lora_B tensors are exactly zero, e.g. {zero[0]}: those "
                             "modules do nothing", f"{where}#{zero[0]}", severity=Severity.INFO,
                             title="Some lora_B tensors are all zeros")
