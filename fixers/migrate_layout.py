"""migrate-layout: move adapter weights to the module layout the target transformers builds.

VLM decoders moved under `model.language_model` in transformers 4.52 (a rename either way); MoE experts
became fused 3-D parameters in transformers 5 (a data conversion either way, in `moe_layout`).
"""
from __future__ import annotations

import re

from adapter_doctor.adapter_keys import BASE_PREFIX, parse_key
from adapter_doctor.base_model import BaseModel, arch_facts, expert_regex, family_of

from .context import FixContext
from .plan import ABSENT, ConfigEdit, FixerPlan, Refusal, TensorChange
from .tensors import read_tensors

ID = "migrate-layout"


def plan(ctx: FixContext) -> FixerPlan:
    out = FixerPlan()
    base = ctx.check.base
    answer = next(f.id for f in ctx.findings)
    if base is None or not base.modules:
        out.refusals.append(Refusal(answer, "the target layout depends on the base: pass --base DIR"))
        return out
    tensors = ctx.artifact.tensors or {}
    renames = _vlm_renames(list(tensors), base)
    if renames:
        out.renames = renames
        out.changes = [TensorChange(a, b, "rename (VLM layout)", answer) for a, b in renames.items()]
        return out
    direction = _moe_direction(list(tensors), base)
    if direction is None:
        out.refusals.append(Refusal(answer, "no known layout change maps these modules onto the base"))
        return out
    source = ctx.artifact.primary_weights
    if source is None or source.header is None:
        out.refusals.append(Refusal(answer, "convert the pickle to safetensors first (doctor fix --only ADC423)"))
        return out
    from . import moe_layout  # numpy work, only when an MoE adapter needs it

    raw, _ = read_tensors(source.path)
    raw = {parse_key(n).canonical: t for n, t in raw.items()}
    convert = moe_layout.per_expert_to_fused if direction == "fused" else moe_layout.fused_to_per_expert
    try:
        out.tensors, config = convert(raw, ctx.config, base.config)
    except moe_layout.LayoutRefusal as exc:
        out.refusals.append(Refusal(answer, str(exc)))
        return out
    out.edits = [ConfigEdit(k, ctx.config.get(k, ABSENT), config.get(k, ABSENT), answer, f"{direction} MoE layout")
                 for k in sorted(set(ctx.config) | set(config)) if ctx.config.get(k, ABSENT) != config.get(k, ABSENT)]
    out.changes = [TensorChange(f"{len(raw)} tensors", f"{len(out.tensors)} tensors", f"MoE layout -> {direction}", answer)]
    return out


def _vlm_renames(names: list[str], base: BaseModel) -> dict[str, str]:
    renames = {}
    for name in names:
        module = parse_key(name).module
        if module in base.modules:
            continue
        for old, new in arch_facts()["vlm"]["renames"]:
            for src, dst in ((old, new), (new, old)):
                if module.startswith(src) and dst + module[len(src):] in base.modules:
                    canonical = parse_key(name).canonical  # wrapper prefixes go at the same time
                    prefix = BASE_PREFIX + src
                    if canonical.startswith(prefix):
                        renames[name] = BASE_PREFIX + dst + canonical[len(prefix):]
    return renames


def _moe_direction(names: list[str], base: BaseModel) -> str | None:
    layout = arch_facts()["moe"]["layouts"].get(family_of(base.model_type) or "")
    if layout is None:
        return None
    per_expert = re.compile(expert_regex(layout["per_expert"]))
    fused_in_base = any(m.kind == "experts" for m in base.modules.values())
    modules = {parse_key(n).module for n in names}
    if fused_in_base and any(per_expert.search(m + ".") for m in modules):
        return "fused"
    fused = layout["fused"].rstrip(".")
    if not fused_in_base and any(m.endswith(fused) and m not in base.modules for m in modules):
        return "per-expert"
    return None
