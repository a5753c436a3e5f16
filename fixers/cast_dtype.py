"""cast-dtype: store float tensors in bf16 or fp16 (`--dtype`, opt-in: it rounds)."""
from __future__ import annotations

from .context import FixContext
from .plan import FixerPlan, Refusal, TensorChange

ID = "cast-dtype"
TARGETS = {"bf16": "BF16", "fp16": "F16"}


def plan(ctx: FixContext) -> FixerPlan:
    out = FixerPlan()
    answer = next((f.id for f in ctx.findings), "ADC704")  # --dtype alone asks for the cast too
    if ctx.options.dtype is None:
        out.refusals.append(Refusal(answer, "casting rounds the weights, so it is opt-in: pass --dtype bf16 (or fp16)"))
        return out
    dtype = TARGETS[ctx.options.dtype]
    tensors = ctx.artifact.tensors or {}
    cast = [n for n, t in tensors.items() if t.dtype in ("F32", "F64") or t.dtype in ("BF16", "F16") and t.dtype != dtype]
    if cast:
        out.cast = dtype
        kinds = sorted({tensors[n].dtype for n in cast})
        out.changes = [TensorChange(f"{len(cast)} tensors ({', '.join(kinds)})", f"{dtype}", f"cast {'/'.join(kinds)} -> {dtype}", answer)]
    return out
