"""Gated activations of the MLP: act(gate) · up, with SiLU (SwiGLU) or GELU (GeGLU)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up."""
    import torch.nn.functional as F

    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate) · up; "tanh" is Gemma's gelu_pytorch_tanh, "none" the exact erf form."""
    import torch.nn.functional as F

    return F.gelu(gate, approximate=approximate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU through the fastest implementation available for the inputs' device (the reference on CPU)."""
    return swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU through the fastest implementation available for the inputs' device (the reference on CPU)."""
    return geglu_reference(gate, up, approximate)
