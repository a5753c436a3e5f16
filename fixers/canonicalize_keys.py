"""canonicalize-keys: tensor names as PEFT saves them (no wrapper prefixes, no adapter name, base prefix)."""
from __future__ import annotations

from adapter_doctor.adapter_keys import AdapterKey, parse_key

from .context import FixContext
from .plan import FixerPlan, Refusal, TensorChange

ID = "canonicalize-keys"


def _answers(key: AdapterKey) -> str:
    if key.wrappers:
        return "ADC501"
    return "ADC502" if key.adapter_name else "ADC503"


def plan(ctx: FixContext) -> FixerPlan:
    out = FixerPlan()
    tensors = ctx.artifact.tensors or {}
    keys = [parse_key(name) for name in tensors]
    wanted = ctx.ids()
    moves = {k.name: k for k in keys if k.canonical != k.name and _answers(k) in wanted}
    final = [moves[k.name].canonical if k.name in moves else k.name for k in keys]
    if len(set(final)) != len(final):
        clash = next(n for n in final if final.count(n) > 1)
        out.refusals.append(Refusal(next(iter(wanted)), f"two tensors would both be named {clash}"))
        return out
    out.renames = {name: key.canonical for name, key in moves.items()}
    out.changes = [TensorChange(name, key.canonical, "rename", _answers(key)) for name, key in moves.items()]
    return out
