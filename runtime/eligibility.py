"""Which PEFT layers the fused kernels may compute, and their parts: the runtime's decision, not the kernels'.

`lora_parts` reads the pieces out of a PEFT `lora.Linear`, or says why that layer must run as PEFT runs it
(dropout, DoRA and other variants, a LoRA bias, several active adapters, a merged or disabled adapter, hooks
that a direct call would skip). Eligibility is read at every call: adapters are enabled, disabled, merged and
switched while a model lives, and the answer must follow; only a checkpointed layer's replay takes the answers
its forward got (`tape.py`), so that it recomputes what the forward computed. `head_parts` does the same for the
causal LM head.

A LoRA layer on a bitsandbytes `Linear4bit` base (nf4 or fp4, double-quantized or not) gets `Lora4bitParts`:
the packed weight and its quant state as plain tensors, read from `Params4bit.quant_state`, for the 4-bit path.
Every other LoRA layer on a linear base (8-bit and other quantized bases, unknown 4-bit layouts) is still a LoRA
projection: it falls back with its reason, so that the report names every projection the fused path skips.
"""
from __future__ import annotations

import functools
import sys
from typing import Any

from adapter_doctor.kernels import Lora4bitParts, LoraParts, Packed4bit

from .sharding import is_partial


@functools.cache
def _peft_lora_linear() -> type | None:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    return Linear


@functools.cache
def _peft_lora_layer() -> type | None:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return None
    return LoraLayer


@functools.cache
def _peft_lora_4bit_class() -> type | None:
    try:
        from peft.tuners.lora.bnb import Linear4bit  # defined only where bitsandbytes is installed
    except ImportError:
        return None
    return Linear4bit


def _peft_lora_4bit() -> type | None:
    """PEFT's LoRA layer for 4-bit bases; looked up only once bitsandbytes is imported (a 4-bit base cannot
    exist before), so that a bf16 model never pays for importing it."""
    return _peft_lora_4bit_class() if "bitsandbytes" in sys.modules else None


def _bnb_linear4bit() -> type | None:
    return getattr(sys.modules.get("bitsandbytes.nn"), "Linear4bit", None)


def is_lora_linear(module: Any) -> bool:
    """Whether `module` is a PEFT LoRA layer on a linear base, plain or quantized (`lora.Linear`, the bnb
    `Linear4bit` and `Linear8bitLt` layers...): a projection, fused or falling back."""
    import torch.nn as nn

    cls, layer = _peft_lora_linear(), _peft_lora_layer()
    if cls is not None and isinstance(module, cls):
        return True
    return layer is not None and isinstance(module, layer) and isinstance(module, nn.Module) \
        and isinstance(getattr(module, "base_layer", None), nn.Linear)


def is_4bit_base(base: Any) -> bool:
    """Whether `base` runs bitsandbytes' Linear4bit forward (LinearNF4 and LinearFP4 included)."""
    cls = _bnb_linear4bit()
    return cls is not None and isinstance(base, cls) and type(base).forward is cls.forward


def why_not_4bit(base: Any) -> str | None:  # noqa: PLR0911 - one rule per return
    """Why the 4-bit path cannot read this Linear4bit's weight, or None when it can."""
    state = getattr(base.weight, "quant_state", None)
    if state is None:
        return "4-bit weight without its quant state (not quantized yet)"
    if state.quant_type not in ("nf4", "fp4"):
        return f"4-bit quant_type {state.quant_type!r}"
    if getattr(state, "packing_format_for_cpu", False):
        return "4-bit weight repacked for bitsandbytes' CPU kernel"
    if not isinstance(state.blocksize, int) or state.blocksize < 2 or state.blocksize % 2:
        return f"4-bit blocksize {state.blocksize}"
    if state.shape is None or tuple(state.shape) != (base.out_features, base.in_features):
        return f"4-bit weight of shape {None if state.shape is None else tuple(state.shape)}, not [out, in]"
    if state.code is None or state.code.numel() != 16:
        return "4-bit code table is not 16 values"
    if base.weight.data.numel() * base.weight.data.element_size() * 2 < base.out_features * base.in_features:
        return "4-bit weight holds fewer bytes than its shape needs"
    if getattr(state, "nested", False):
        inner = state.state2
        if inner is None or state.offset is None or inner.code is None or inner.code.numel() != 256:
            return "double-quantized absmax without a 256-value code table and offset"
        if state.absmax.dtype.is_floating_point:
            return "double-quantized absmax stored as floats"
    return None


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooked(module: Any) -> bool:
    """Whether calling `module` runs more than its class's forward: hooks, or an instance-level forward (which a
    direct computation, or a graph's replay, would skip)."""
    # Read from the instance's own dictionary, without a generator: this runs four times per projection and call.
    own = module.__dict__
    for name in _HOOKS:
        if own.get(name):
            return True
    return "forward" in own


@functools.cache
def _global_hook_dicts() -> tuple[dict, ...]:
    # torch's module-level registries of hooks on every module: mutated in place, never rebound.
    from torch.nn.modules import module

    return tuple(d for d in (getattr(module, f"_global{name}", None) for name in _HOOKS) if d is not None)


def global_hooks() -> bool:
    """Whether hooks are registered on every module (torch's global registries)."""
    return any(_global_hook_dicts())


def _sharded(*tensors: Any) -> bool:
    # A DTensor here is a shard no FSDP pre-forward hook gathered (tensor parallelism, or a module called outside
    # its FSDP unit's forward): the kernels would take the local shard for the whole weight. ZeRO-3 leaves an
    # empty placeholder until its own hook on that module gathers it.
    return any(is_partial(t) for t in tensors)


def why_not_fused(module: Any) -> str | None:
    """Why this LoRA layer cannot take the fused path right now, or None when it can."""
    return _examine(module)[0]


def _examine(module: Any) -> tuple[str | None, tuple[Any, ...]]:  # noqa: C901, PLR0911 - one rule per return
    """(why not, ()) or (None, (adapter name, base layer, A's weight, B's weight)): the eligibility rules, top to
    bottom, and what `lora_parts` needs, each read once (every Module attribute is a dictionary walk, and this
    runs for every projection at every call)."""
    import torch.nn as nn

    four_bit = _peft_lora_4bit()
    if type(module).forward not in (_peft_lora_linear().forward, getattr(four_bit, "forward", None)):
        if type(module).__module__.startswith("peft."):
            return f"PEFT's {type(module).__name__} layer has no fused path", ()
        return f"{type(module).__name__}.forward is not PEFT's", ()
    if module.disable_adapters:
        return "adapters disabled", ()
    if module.merged:
        return "adapter merged into the base weight", ()
    lora_as = module.lora_A
    active = [name for name in module.active_adapters if name in lora_as]
    if len(active) != 1:
        return f"{len(active)} active adapters", ()
    name = active[0]
    base, lora_a, lora_b = module.base_layer, lora_as[name], module.lora_B[name]
    if is_4bit_base(base):
        reason = why_not_4bit(base)
        if reason is not None:
            return reason, ()
    elif not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer is {type(base).__name__}", ()
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out", ()
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) != 0.0:
        return f"lora_dropout={getattr(dropout, 'p', type(dropout).__name__)}", ()
    if getattr(module, "use_dora", {}).get(name, False):
        return "DoRA", ()
    variants = getattr(module, "lora_variant", {})
    if name in variants:
        return f"LoRA variant {type(variants[name]).__name__}", ()
    if lora_b.bias is not None:
        return "lora_bias", ()
    weight, a, b = base.weight, lora_a.weight, lora_b.weight
    if _sharded(weight, a, b):
        return "weights are shards (DTensor, ZeRO-3) that no hook gathered", ()
    if not getattr(module, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled", ()
    if hooked(module) or hooked(base) or hooked(lora_a) or hooked(lora_b) or global_hooks():
        return "module hooks", ()
    return None, (name, base, a, b)


def lora_parts(module: Any) -> LoraParts | Lora4bitParts | None:
    """(weight, bias, A, B, scaling) of an eligible LoRA layer, `Lora4bitParts` on a 4-bit base; None when it
    must be called as a module."""
    if not is_lora_linear(module):
        return None
    reason, found = _examine(module)
    if reason is not None:
        return None
    name, base, a, b = found
    scaling = module.scaling[name]
    if is_4bit_base(base):
        compute = base.compute_dtype if getattr(base, "compute_type_is_set", True) else None
        return Lora4bitParts(packed_4bit(base.weight), base.bias, a, b, scaling, compute)
    return LoraParts(base.weight, base.bias, a, b, scaling)


def still_held(module: Any, parts: LoraParts | Lora4bitParts) -> bool:
    """Whether LoRA layer `module` still holds the A and B that `parts` were read from, under any adapter name:
    a wrapper may swap parameter objects between a forward and its backward, while switching the active
    adapter or a requires_grad flag leaves them."""
    return any(a.weight is parts.lora_a for a in module.lora_A.values()) \
        and any(b.weight is parts.lora_b for b in module.lora_B.values())


def path_taken(module: Any) -> tuple[str, str]:
    """("fused" or "fused 4-bit <type>", "") or ("fallback", reason) for a LoRA projection, as the report says."""
    reason = why_not_fused(module)
    if reason is not None:
        return "fallback", reason
    base = module.base_layer
    if not is_4bit_base(base):
        return "fused", ""
    state = base.weight.quant_state
    return f"fused 4-bit {state.quant_type}{', double-quantized' if getattr(state, 'nested', False) else ''}", ""


def packed_4bit(weight: Any) -> Packed4bit:
    """The kernels' view of a bitsandbytes `Params4bit`: its bytes and its quant state's tensors."""
    import torch

    state = weight.quant_state
    shape = (int(state.shape[0]), int(state.shape[1]))
    if not getattr(state, "nested", False):
        return Packed4bit(weight.data, state.absmax, state.code, state.blocksize, shape)
    inner, offset = state.state2, state.offset
    if not torch.is_tensor(offset):  # older quant states carry a float
        offset = torch.tensor(float(offset), dtype=torch.float32, device=state.absmax.device)
    return Packed4bit(weight.data, state.absmax, state.code, state.blocksize, shape, inner.absmax, inner.code,
                      inner.blocksize, offset)


def head_parts(lm_head: Any) -> tuple[Any, tuple[Any, Any, float] | None]:
    """(weight, LoRA factors or None) of a causal LM's output projection, for `linear_cross_entropy`. Raises
    ValueError for a head the fused loss cannot compute exactly (a bias, LoRA dropout or variants, hooks...),
    so that an adapter on lm_head is never silently left untrained: call the module and the reference then."""
    import torch.nn as nn

    if is_lora_linear(lm_head):
        parts = lora_parts(lm_head)
        if parts is None:
            raise ValueError(f"lm_head: its LoRA layer cannot take the fused loss ({why_not_fused(lm_head)})")
        if isinstance(parts, Lora4bitParts):
            raise ValueError("lm_head: a 4-bit base; the fused loss takes a dense weight")
        if parts.bias is not None:
            raise ValueError("lm_head: the fused loss has no bias term")
        return parts.weight, (parts.lora_a, parts.lora_b, parts.scaling)
    if _sharded(lm_head.weight):
        raise ValueError("lm_head: its weight is a shard (DTensor, ZeRO-3) that no hook gathered")
    if type(lm_head).forward is not nn.Linear.forward or lm_head.bias is not None or hooked(lm_head):
        raise ValueError(f"lm_head: a {type(lm_head).__name__} (with bias or hooks, or not a Linear) must be called "
                         "as a module")
    return lm_head.weight, None
