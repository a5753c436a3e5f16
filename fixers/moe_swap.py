"""moe-swap: put the LoRA factors of 3-D expert parameters saved by PEFT 0.17/0.18 on the sides newer PEFT reads.

0.18 computes each expert's delta as A over dim 1 and B over dim 2 of the (experts, d1, d2) parameter; 0.19+
puts A over d2 and B over d1. The same delta in the new layout is a permutation of the old factors, so the
values are moved, never recomputed: new B[d1, r, e] = old A[e, r, d1], new A[e, r, d2] = old B[d2, r, e].
"""
from __future__ import annotations

import numpy as np
from adapter_doctor.expert_lora import SWAP_FIXED, expert_pairs
from adapter_doctor.knowledge import parse_version
from adapter_doctor.safetensors_header import unsigned_view

from .context import FixContext
from .plan import ConfigEdit, FixerPlan, Refusal, TensorChange
from .tensors import RawTensor, read_tensors

ID = "moe-swap"


def _permuted(t: RawTensor, shape: tuple[int, int, int], out: tuple[int, int]) -> RawTensor:
    # Moved as bit patterns: exact for any dtype.
    words = np.frombuffer(t.data, dtype=unsigned_view(t.dtype)).reshape(shape)
    return RawTensor(t.dtype, out, np.ascontiguousarray(words.transpose(2, 1, 0)).reshape(out).tobytes())


def plan(ctx: FixContext) -> FixerPlan:
    out = FixerPlan()
    answer = next((f.id for f in ctx.findings), "ADC606")
    source = ctx.artifact.primary_weights
    if source is None or source.header is None:
        out.refusals.append(Refusal(answer, "convert the pickle to safetensors first (doctor fix --only ADC423)"))
        return out
    raw, _ = read_tensors(source.path)
    if any(unsigned_view(t.dtype) is None for t in raw.values()):
        out.refusals.append(Refusal(answer, "a tensor's dtype is not a whole number of bytes"))
        return out
    pairs = expert_pairs(ctx.config, list(raw), {n: t.shape for n, t in raw.items()}, ctx.check.matcher)
    if not pairs:
        out.refusals.append(Refusal(answer, "no LoRA pair on a 3-D expert parameter was found"))
        return out
    tensors = dict(raw)
    for a_name, b_name, experts in pairs:
        a, b = raw[a_name], raw[b_name]
        rank, d1, d2 = a.shape[0] // experts, a.shape[1], b.shape[0]
        tensors[b_name] = _permuted(a, (experts, rank, d1), (d1, rank * experts))
        tensors[a_name] = _permuted(b, (d2, rank, experts), (experts * rank, d2))
    out.tensors = tensors
    stamp = ctx.config.get("peft_version")
    saved = parse_version(stamp) if isinstance(stamp, str) else None
    marked = f"{saved.public}+{SWAP_FIXED}" if saved is not None else stamp
    out.edits = [ConfigEdit("peft_version", stamp, marked, answer, "record that the factors were swapped back")]
    out.changes = [TensorChange(f"{len(pairs)} lora_A/lora_B pairs", "the same values, sides exchanged",
                                "MoE in/out swap", answer)]
    return out
