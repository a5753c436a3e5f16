"""Calling projections: fused LoRA when the layers allow it, the modules themselves otherwise."""
from __future__ import annotations

from typing import Any, Sequence

from .eligibility import lora_parts


def project(module: Any, x: Any, kernels: Any) -> Any:
    """`module(x)`, through the kernel set's LoRA linear when `module` is an eligible PEFT lora.Linear."""
    parts = lora_parts(module)
    return module(x) if parts is None else kernels.lora_linear(x, *parts)


def project_many(modules: Sequence[Any], x: Any, kernels: Any) -> list[Any]:
    """[m(x) for m in modules], with one read and one saved copy of `x` when every layer takes the fused path
    (q/k/v, gate/up)."""
    parts = [lora_parts(m) for m in modules]
    if all(p is not None for p in parts):
        return list(kernels.lora_multi_linear(x, parts))
    return [module(x) if p is None else kernels.lora_linear(x, *p) for module, p in zip(modules, parts)]
