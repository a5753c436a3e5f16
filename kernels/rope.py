"""Rotary position embedding in the rotate-half convention (Llama, Mistral, Qwen, Gemma).

q, k: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, head_dim] (batch may be 1 and broadcast), already
duplicated across the two halves as the models' rotary modules produce them. Scaled variants (llama3, linear,
dynamic) and position ids only change cos and sin, so every kernel here covers them.

The Triton path rotates q and k in place (any strides, so the transposed views of the projections' outputs
are rotated where they lie) and saves only cos and sin. Backward applies the transposed rotation, in place on
the incoming gradients.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ._triton import jit, lazy_functions, next_power_of_2, on_triton

if TYPE_CHECKING:
    import torch

tl: Any = None  # triton.language, bound at the first launch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q·cos + rot(q)·sin, k·cos + rot(k)·sin), broadcasting cos and sin over the head dimension."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@jit
def _rotate_heads(X, stride_h, stride_d, n_heads, c1, c2, s1, s2, BACKWARD: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < HALF)
    first = X + heads * stride_h + dims * stride_d
    second = first + HALF * stride_d
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of [[c1, -s1], [s2, c2]]
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(first, y1.to(X.dtype.element_ty), mask=mask)
    tl.store(second, y2.to(X.dtype.element_ty), mask=mask)


@jit
def _rope_kernel(Q, K, COS, SIN, q_sb, q_sh, q_ss, q_sd, k_sb, k_sh, k_ss, k_sd, cos_sb, cos_ss, sin_sb, sin_ss,
                 seq_len, n_q_heads, n_k_heads, BACKWARD: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (batch, position): cos and sin are read once for all the q and k heads there.
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    s = (pid % seq_len).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < HALF
    cos_row = COS + b * cos_sb + s * cos_ss
    sin_row = SIN + b * sin_sb + s * sin_ss
    c1 = tl.load(cos_row + dims, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + dims, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(Q + b * q_sb + s * q_ss, q_sh, q_sd, n_q_heads, c1, c2, s1, s2, BACKWARD, HALF, BLOCK_QH, BLOCK_D)
    _rotate_heads(K + b * k_sb + s * k_ss, k_sh, k_sd, n_k_heads, c1, c2, s1, s2, BACKWARD, HALF, BLOCK_KH, BLOCK_D)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    if head_dim % 2 or k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} do not pair up")
    cos, sin = (t.expand(batch, seq_len, head_dim) for t in (cos, sin))  # a batch of 1 broadcasts (stride 0)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    half = head_dim // 2
    block_d = next_power_of_2(half)
    block_qh, block_kh = next_power_of_2(n_q_heads), next_power_of_2(n_k_heads)
    warps = max(1, min(8, block_qh * block_d // 256))
    _rope_kernel[(batch * seq_len,)](q, k, cos, sin, *q.stride(), *k.stride(), cos.stride(0), cos.stride(1),
                                     sin.stride(0), sin.stride(1), seq_len, n_q_heads, n_k_heads, BACKWARD=backward,
                                     HALF=half, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_D=block_d,
                                     num_warps=warps)


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q and k in place."""
    _launch(q, k, cos, sin, backward=False)


def rope_backward(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the gradients of q and k back, in place."""
    _launch(dq, dk, cos, sin, backward=True)


def _non_overlapping(t: torch.Tensor) -> bool:
    """Whether no two elements of `t` share memory, so that an in-place kernel may write all of them."""
    end = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride < end:
            return False
        end = stride * size
    return True


def _writable(t: torch.Tensor) -> torch.Tensor:
    return t if _non_overlapping(t) else t.contiguous()


@functools.cache
def _rope_function() -> type:
    import torch
    from torch.autograd.function import once_differentiable
    from torch.autograd.graph import increment_version

    class RoPEFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Rotated in place but not marked dirty: q and k are usually views of the projections' outputs, and
            # autograd would route a dirty view's gradient through a full copy of its base. The version bump
            # still makes any backward that saved the unrotated q or k fail loudly instead of reading rotated
            # values; the outputs alias the inputs, and the caller uses only the outputs from here on.
            rope_forward(q, k, cos, sin)
            increment_version(q)
            increment_version(k)
            ctx.save_for_backward(cos, sin)
            return q, k

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor) -> tuple[Any, ...]:
            # Rotated in place: attention's backward hands q and k fresh gradients that nothing else holds.
            cos, sin = ctx.saved_tensors
            dq, dk = _writable(dq), _writable(dk)
            rope_backward(dq, dk, cos, sin)
            return dq, dk, None, None

    return RoPEFunction


__getattr__ = lazy_functions(__name__, RoPEFunction=_rope_function)


def _rotatable(t: torch.Tensor) -> torch.Tensor:
    # In place is impossible on a leaf that requires grad (or a view of one) and unsafe on overlapping memory.
    root = t if t._base is None else t._base
    if (t.requires_grad and root.is_leaf) or not _non_overlapping(t):
        return t.clone()
    return t


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE through the Triton kernel, rotating q and k in place and returning them. The caller must not use
    the unrotated q and k afterwards; leaves and overlapping views are copied first."""
    import torch

    q, k = _rotatable(q), _rotatable(k)
    if torch.is_grad_enabled():
        return _rope_function().apply(q, k, cos, sin)
    rope_forward(q, k, cos, sin)  # nothing to record (a checkpoint's first forward): no Function
    torch.autograd.graph.increment_version(q)  # as the Function does: a saver of the unrotated values fails loudly
    torch.autograd.graph.increment_version(k)
    return q, k


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE through the fastest implementation available for the inputs' device (the reference on CPU). On the
    Triton path q and k are rotated in place; cos and sin that require grad take the reference."""
    if on_triton(q, k, cos, sin) and not (cos.requires_grad or sin.requires_grad):
        return rope_triton(q, k, cos, sin)
    return rope_reference(q, k, cos, sin)
