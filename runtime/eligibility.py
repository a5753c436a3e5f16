"""Which PEFT layers the fused kernels may compute, and their parts: the runtime's decision, not the kernels'.

`lora_parts` reads the pieces out of a PEFT `lora.Linear`, or says why that layer must run as PEFT runs it
(dropout, DoRA and other variants, a LoRA bias, several active adapters, a merged or disabled adapter, hooks
that a direct call would skip). Eligibility is read at every call: adapters are enabled, disabled, merged and
switched while a model lives, and the answer must follow. `head_parts` does the same for the causal LM head.
"""
from __future__ import annotations

import functools
from typing import Any

from adapter_doctor.kernels import LoraParts


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


def why_not_fused(module: Any) -> str | None:  # noqa: C901, PLR0911 - one rule per return, read top to bottom
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


def head_parts(lm_head: Any) -> tuple[Any, tuple[Any, Any, float] | None]:
    """(weight, LoRA factors or None) of a causal LM's output projection, for `linear_cross_entropy`. Raises
    ValueError for a head the fused loss cannot compute exactly (a bias, LoRA dropout or variants, hooks...),
    so that an adapter on lm_head is never silently left untrained: call the module and the reference then."""
    import torch.nn as nn

    if is_lora_linear(lm_head):
        parts = lora_parts(lm_head)
        if parts is None:
            raise ValueError(f"lm_head: its LoRA layer cannot take the fused loss ({why_not_fused(lm_head)})")
        if parts.bias is not None:
            raise ValueError("lm_head: the fused loss has no bias term")
        return parts.weight, (parts.lora_a, parts.lora_b, parts.scaling)
    if type(lm_head).forward is not nn.Linear.forward or lm_head.bias is not None or _hooked(lm_head):
        raise ValueError(f"lm_head: a {type(lm_head).__name__} (with bias or hooks, or not a Linear) must be called "
                         "as a module")
    return lm_head.weight, None
