"""set-base: record another base model (`--set-base NAME_OR_PATH`)."""
from __future__ import annotations

from .context import FixContext
from .plan import ConfigEdit, FixerPlan, Refusal

ID = "set-base"


def plan(ctx: FixContext) -> FixerPlan:
    out = FixerPlan()
    new = ctx.options.set_base
    if new is None:
        out.refusals += [Refusal(f.id, "pass --set-base NAME_OR_PATH to say which base to record") for f in ctx.findings]
        return out
    old = ctx.config.get("base_model_name_or_path")
    if old != new:
        answers = next((f.id for f in ctx.findings), "set-base")
        out.edits.append(ConfigEdit("base_model_name_or_path", old, new, answers, "--set-base"))
    return out
