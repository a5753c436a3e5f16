"""bone-to-miss: rewrite a BONE adapter (removed in PEFT 0.19) as MiSS, which replaced it.

MiSS's layer is BONE's with an optional dropout and a "mini" mode added: with `miss_dropout` 0 (its default)
and `init_weights` True or "bat" the forward is the same code, and `miss_block` holds what `bone_block` held.
So the fix renames tensors (data bytes copied untouched) and sets `peft_type`; a reload gives the same logits.
"""
from __future__ import annotations

from .context import FixContext
from .plan import ConfigEdit, FixerPlan, Refusal, TensorChange

ID = "bone-to-miss"
_VERIFIED_INITS = (True, "bat")  # the modes whose MiSS forward is BONE's line for line


def plan(ctx: FixContext) -> FixerPlan:
    out = FixerPlan()
    answer = next((f.id for f in ctx.findings), "ADC209")
    config = ctx.config
    if config.get("bias", "none") != "none":
        out.refusals.append(Refusal(answer, f"bias={config.get('bias')!r}: MiSS names its bias modes differently"))
        return out
    if config.get("init_weights", True) not in _VERIFIED_INITS:
        out.refusals.append(Refusal(answer, f"init_weights={config.get('init_weights')!r} has no MiSS equivalent"))
        return out
    source = ctx.artifact.primary_weights
    if source is not None and source.header is None:  # renames stream a safetensors file; a pickle is converted first
        out.refusals.append(Refusal(answer, "convert the pickle to safetensors first (doctor fix --only ADC423)"))
        return out
    names = list(ctx.artifact.tensors or {})
    out.renames = {n: n.replace(".bone_block", ".miss_block") for n in names if ".bone_block" in n}
    out.edits = [ConfigEdit("peft_type", "BONE", "MISS", answer, "MiSS replaced BONE in PEFT 0.19")]
    out.changes = [TensorChange(a, b, "rename (BONE -> MiSS)", answer) for a, b in out.renames.items()]
    return out
