"""Rotary position embedding in the rotate-half convention (Llama, Mistral, Qwen, Gemma).

q, k: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, head_dim], already duplicated across the two
halves as the models' rotary modules produce them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q·cos + rot(q)·sin, k·cos + rot(k)·sin), broadcasting cos and sin over the head dimension."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE through the fastest implementation available for the inputs' device (the reference on CPU)."""
    return rope_reference(q, k, cos, sin)
