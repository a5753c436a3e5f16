"""pickle-to-safetensors: replace adapter_model.bin by an equal adapter_model.safetensors (needs torch)."""
from __future__ import annotations

from .context import FixContext
from .plan import FixerPlan, Refusal, TensorChange

ID = "pickle-to-safetensors"


def plan(ctx: FixContext) -> FixerPlan:
    out = FixerPlan()
    weights = ctx.artifact.primary_weights
    answer = next(f.id for f in ctx.findings)
    if weights is None or weights.pickle is None or weights.path.suffix == ".safetensors":
        return out
    if not weights.pickle.passed or weights.pickle.tensors is None:
        out.refusals.append(Refusal(answer, "the pickle did not pass the opcode scan; it will not be loaded"))
        return out
    out.from_pickle = True
    out.remove = {weights.path.name}
    out.changes = [TensorChange(weights.path.name, "adapter_model.safetensors",
                                f"pickle -> safetensors ({len(weights.pickle.tensors)} tensors)", answer)]
    return out
