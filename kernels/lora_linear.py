"""LoRA linear: y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ, without ever forming W + s·B·A.

`lora_parts` reads the pieces out of a PEFT `lora.Linear`, or says why that layer must run as PEFT runs it
(dropout, DoRA and other variants, a LoRA bias, several active adapters, a merged or disabled adapter,
hooks that a direct call would skip). Eligibility is read at every call: adapters are enabled, disabled,
merged and switched while a model lives, and the answer must follow.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch


class LoraParts(NamedTuple):
    weight: torch.Tensor  # [out, in], the frozen base weight
    bias: torch.Tensor | None
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scaling: float


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Base projection plus the low-rank update, in the order and dtypes PEFT uses (x is cast to A's dtype)."""
    import torch.nn.functional as F

    out = F.linear(x, weight, bias)
    low = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling
    return (out + low).to(out.dtype)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA linear through the fastest implementation available for `x`'s device (the reference on CPU)."""
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling)


@functools.cache
def _peft_lora_linear() -> type | None:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    return Linear


def is_lora_linear(module: Any) -> bool:
    """Whether `module` is a PEFT `lora.Linear` (not a quantized or other LoRA layer)."""
    cls = _peft_lora_linear()
    return cls is not None and isinstance(module, cls)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module: Any) -> bool:
    # A direct computation skips what Module.__call__ would run: hooks, and an instance-level forward.
    return any(getattr(module, name, None) for name in _HOOKS) or "forward" in module.__dict__


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return any(getattr(module, f"_global{name}", None) for name in _HOOKS)


def why_not_fused(module: Any) -> str | None:
    """Why this `lora.Linear` cannot take the fused path right now, or None when it can."""
    import torch.nn as nn

    if type(module).forward is not _peft_lora_linear().forward:
        return f"{type(module).__name__}.forward is not PEFT's"
    if module.disable_adapters:
        return "adapters disabled"
    if module.merged:
        return "adapter merged into the base weight"
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    name = active[0]
    base = module.base_layer
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer is {type(base).__name__}"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) != 0.0:
        return f"lora_dropout={getattr(dropout, 'p', type(dropout).__name__)}"
    if getattr(module, "use_dora", {}).get(name, False):
        return "DoRA"
    variants = getattr(module, "lora_variant", {})
    if name in variants:
        return f"LoRA variant {type(variants[name]).__name__}"
    if module.lora_B[name].bias is not None:
        return "lora_bias"
    if not getattr(module, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled"
    if any(_hooked(m) for m in (module, base, module.lora_A[name], module.lora_B[name])) or _global_hooks():
        return "module hooks"
    return None


def lora_parts(module: Any) -> LoraParts | None:
    """(weight, bias, A, B, scaling) of an eligible `lora.Linear`; None when it must be called as a module."""
    if not is_lora_linear(module) or why_not_fused(module) is not None:
        return None
    name = next(n for n in module.active_adapters if n in module.lora_A)
    base = module.base_layer
    return LoraParts(base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
                     module.scaling[name])
