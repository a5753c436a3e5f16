"""RMSNorm: y = x / sqrt(mean(x²) + eps) · (offset + w), normalised in fp32.

Llama-style norms (offset 0) cast the normalised input back to its dtype and then scale by the weight;
Gemma-style norms (offset 1, stored weight is w - 1) scale in fp32 and cast the product. Both orders are
kept because they round differently in bf16 and each must match its own architecture.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       scale_in_fp32: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension; differentiable in `x` and `weight`."""
    import torch

    dtype = x.dtype
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if scale_in_fp32:
        scale = weight.to(torch.float32)
        return (normed * (scale + offset if offset else scale)).to(dtype)
    return (weight + offset if offset else weight) * normed.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             scale_in_fp32: bool = False) -> torch.Tensor:
    """RMSNorm through the fastest implementation available for `x`'s device (the reference on CPU)."""
    return rms_norm_reference(x, weight, eps, offset, scale_in_fp32)
