"""Fused kernels for the runtime, each with a PyTorch reference beside it.

`kernel_set(name)` returns the functions the patched modules call. "torch" is the PyTorch references (the
CPU path, and the numerics every faster set is tested against); "triton" runs the Triton kernels and fused
autograd Functions on CUDA tensors and the references on anything else; "auto" picks the fastest set this
machine supports. Importing this package imports neither torch nor triton; a set's functions import what they
need. Without grad (a checkpointed layer's first forward, inference) the fused entry points compute their
forward without their autograd Functions: the same values, with no context to build and nothing saved.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from . import cross_entropy, dequant4bit, lora_linear, rms_norm, rope, swiglu
from .cross_entropy import causal_lm_labels, cross_entropy_reference
from .dequant4bit import (
    Lora4bitParts,
    Packed4bit,
    lora4bit_multi_linear_reference,
)
from .lora_linear import (
    LoraParts,
    lora_linear_gradient_only_reference,
    lora_linear_reference,
    lora_multi_linear_reference,
)
from .rms_norm import rms_norm_reference
from .rope import rope_reference
from .swiglu import geglu_reference, swiglu_reference


@dataclass(frozen=True)
class KernelSet:
    name: str
    rms_norm: Callable[..., object]  # (x, weight, eps, offset=0.0, scale_in_fp32=False, in_place=False)
    rope: Callable[..., object]  # (q, k, cos, sin) -> (q, k); the Triton set rotates in place
    swiglu: Callable[..., object]  # (gate, up)
    geglu: Callable[..., object]  # (gate, up, approximate="tanh")
    lora_linear: Callable[..., object]  # (x, weight, bias, lora_a, lora_b, scaling)
    lora_multi_linear: Callable[..., object] = lora_multi_linear_reference  # (x, [LoraParts, ...]) -> [y, ...]
    # (hidden, weight, shifted labels, *, ignore_index, num_items_in_batch, lora, softcap) -> loss
    linear_cross_entropy: Callable[..., object] = cross_entropy_reference
    # (x, [LoraParts, ...]) -> stand-ins whose backward is the projections', or None: for a recomputation that
    # needs only the gradients (the fused set skips the GEMMs; the reference computes the projections)
    lora_linear_gradient_only: Callable[..., object] = lora_linear_gradient_only_reference
    # The same two on 4-bit bases: (x, [Lora4bitParts, ...]) -> [y, ...], and -> stand-ins or None
    lora4bit_multi_linear: Callable[..., object] = lora4bit_multi_linear_reference
    lora4bit_gradient_only: Callable[..., object] = lora4bit_multi_linear_reference  # the reference computes them


TORCH = KernelSet("torch", rms_norm_reference, rope_reference, swiglu_reference, geglu_reference,
                  lora_linear_reference, lora_multi_linear_reference, cross_entropy_reference,
                  lora_linear_gradient_only_reference)
TRITON = KernelSet("triton", rms_norm.rms_norm, rope.rope, swiglu.swiglu, swiglu.geglu, lora_linear.lora_linear,
                   lora_linear.lora_multi_linear, cross_entropy.linear_cross_entropy,
                   lora_linear.lora_linear_gradient_only, dequant4bit.lora4bit_multi_linear,
                   dequant4bit.lora4bit_gradient_only)


@functools.cache
def _triton_usable() -> bool:
    """A CUDA device and an importable triton (checked once: both need importing torch)."""
    import torch

    from ._triton import triton_importable

    return torch.cuda.is_available() and triton_importable()


def available() -> list[str]:
    """Names of the kernel sets this machine can run, fastest last."""
    return ["torch", "triton"] if _triton_usable() else ["torch"]


def kernel_set(name: str = "auto") -> KernelSet:
    """The kernel set called `name`; "auto" is the fastest available."""
    sets = {"torch": TORCH, "triton": TRITON}
    names = available()
    if name == "auto":
        return sets[names[-1]]
    if name not in names:
        raise ValueError(f"kernel set {name!r} is not available here (available: {', '.join(names)})")
    return sets[name]


__all__ = ["TORCH", "TRITON", "KernelSet", "Lora4bitParts", "LoraParts", "Packed4bit", "available", "causal_lm_labels",
           "kernel_set"]
