"""Fused kernels for the runtime, each with a PyTorch reference beside it.

`kernel_set(name)` returns the functions the patched modules call. "torch" is the PyTorch references (the
CPU path, and the numerics every faster set is tested against); "auto" picks the fastest set this machine
supports. Importing this package imports neither torch nor triton; a set's functions import what they need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .lora_linear import LoraParts, is_lora_linear, lora_linear_reference, lora_parts, why_not_fused
from .rms_norm import rms_norm_reference
from .rope import rope_reference
from .swiglu import geglu_reference, swiglu_reference


@dataclass(frozen=True)
class KernelSet:
    name: str
    rms_norm: Callable[..., object]  # (x, weight, eps, offset=0.0, scale_in_fp32=False)
    rope: Callable[..., object]  # (q, k, cos, sin) -> (q, k)
    swiglu: Callable[..., object]  # (gate, up)
    geglu: Callable[..., object]  # (gate, up, approximate="tanh")
    lora_linear: Callable[..., object]  # (x, weight, bias, lora_a, lora_b, scaling)


TORCH = KernelSet("torch", rms_norm_reference, rope_reference, swiglu_reference, geglu_reference,
                  lora_linear_reference)
_SETS = {"torch": TORCH}


def available() -> list[str]:
    """Names of the kernel sets this machine can run, fastest last."""
    return list(_SETS)


def kernel_set(name: str = "auto") -> KernelSet:
    """The kernel set called `name`; "auto" is the fastest available."""
    if name == "auto":
        return _SETS[available()[-1]]
    if name not in _SETS:
        raise ValueError(f"kernel set {name!r} is not available here (available: {', '.join(available())})")
    return _SETS[name]


__all__ = ["TORCH", "KernelSet", "LoraParts", "available", "is_lora_linear", "kernel_set", "lora_parts",
           "why_not_fused"]
