"""Calling projections: fused LoRA when the layers allow it (the 4-bit path on bitsandbytes 4-bit bases), the
modules themselves otherwise."""
from __future__ import annotations

from typing import Any, Sequence

from adapter_doctor.kernels import Lora4bitParts, LoraParts

from .eligibility import lora_parts
from .tape import active


def _parts(module: Any) -> Any:
    # Inside a checkpointed layer, the path its forward took (tape.py); read from the layer otherwise.
    tape = active()
    return lora_parts(module) if tape is None else tape.projection_parts(module, lora_parts)


def _one(module: Any, parts: Any, x: Any, kernels: Any) -> Any:
    if parts is None:
        return module(x)
    if isinstance(parts, Lora4bitParts):
        return kernels.lora4bit_multi_linear(x, [parts])[0]
    return kernels.lora_linear(x, *parts)


def project(module: Any, x: Any, kernels: Any) -> Any:
    """`module(x)`, through the kernel set's LoRA linear when `module` is an eligible PEFT LoRA layer."""
    return _one(module, _parts(module), x, kernels)


def _group(parts: Sequence[Any], kernels: Any) -> tuple[Any, Any] | None:
    """(multi-projection function, gradient-only function) of the kernel set where every projection of one
    input takes the same fused path (q/k/v, gate/up); None otherwise."""
    if all(isinstance(p, LoraParts) for p in parts):
        return kernels.lora_multi_linear, kernels.lora_linear_gradient_only
    if all(isinstance(p, Lora4bitParts) for p in parts) and len({p.compute_dtype for p in parts}) == 1:
        return kernels.lora4bit_multi_linear, kernels.lora4bit_gradient_only
    return None


def project_many(modules: Sequence[Any], x: Any, kernels: Any) -> list[Any]:
    """[m(x) for m in modules], with one read and one saved copy of `x` when every layer takes the same fused
    path (q/k/v, gate/up)."""
    parts = [_parts(m) for m in modules]
    group = _group(parts, kernels)
    if group is not None:
        return list(group[0](x, parts))
    return [_one(module, p, x, kernels) for module, p in zip(modules, parts)]


def gradient_only_many(modules: Sequence[Any], x: Any, kernels: Any) -> list[Any]:
    """Placeholders for [m(x) for m in modules] whose backward is the projections', for a replay that reads no
    value: without their GEMMs where the kernel set provides that, the projections themselves otherwise."""
    parts = [_parts(m) for m in modules]
    group = _group(parts, kernels)
    placeholders = None if group is None else group[1](x, parts)
    if placeholders is None:
        return [_one(module, p, x, kernels) for module, p in zip(modules, parts)]
    return list(placeholders)
