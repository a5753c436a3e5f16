"""The trainable parameters a recomputing autograd Function takes as inputs, so that their gradients leave
through its edges (DDP with find_unused_parameters walks the graph from the loss and must find them)."""
from __future__ import annotations

from typing import Any


def fsdp_unit(module: Any) -> bool:
    """Whether `module` is an FSDP2 unit, whose parameters FSDP swaps between forward and backward."""
    return any(k.__name__ == "FSDPModule" for k in type(module).__mro__)


def trainable_parameters(module: Any) -> list[Any]:
    """The parameters of `module` and its submodules that require grad, once each; none for an FSDP2 unit, whose
    hooks need the gradients accumulated in place."""
    if module is None or fsdp_unit(module):
        return []
    # Module.parameters() builds every submodule's dotted name: several times slower than this walk, once
    # per layer and step on both sides of the checkpoint. Keyed by id: a parameter shared by two submodules once.
    found: dict[int, Any] = {}
    stack = [module]
    while stack:
        module = stack.pop()
        if module is None:  # a submodule slot set to None
            continue
        for p in module._parameters.values():
            if p is not None and p.requires_grad:
                found[id(p)] = p  # a key seen before keeps its place
        stack.extend(reversed(module._modules.values()))  # first child on top: the order of .parameters()
    return list(found.values())
