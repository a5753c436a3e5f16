"""Attention that a checkpointed layer's replay does not compute again.

The replay of a checkpointed layer (`replay.py`) reruns its forward to rebuild what the backward reads. For the
attention block that is the q/k/v GEMMs (on a 4-bit base, their dequantization too), RoPE and the attention's
own forward, though the attention's backward needs only q and k after RoPE, v, the output and the softmax's
log-sum-exp. So where the library would run causal SDPA over whole rows (no mask, no packing, no dropout, no
cache, no softcap or window), the layer's first forward computes it with torch's flash-attention operator,
which returns the log-sum-exp as well, and keeps those five tensors (`record`): 2.5 times the layer's input at
8B shapes, held (on the host, by `checkpoint.py`) where the layer's input and residual sum already are. The
replay (`replay`) then gives the projections gradient-only placeholders and a Function whose value is the
recorded output and whose backward is the attention's, computed by the operator's own backward from the
recorded tensors, with RoPE's transpose applied to dq and dk. Where per-head norms sit between the projections
and RoPE (Qwen3, Gemma 3), q and k are kept before their norms instead, the same bytes: the backward norms and
rotates them again (elementwise work, no GEMM) and takes dq and dk through the norms' own backward. Norms whose
parameters train keep the replay as it was, since this Function would not hand their gradients back.

The operator is the one SDPA itself picks for the call (`torch._fused_sdp_choice`): cuDNN's or flash attention's
on CUDA, the CPU's flash kernel on the CPU; a call SDPA would send elsewhere (memory-efficient, math) runs again
in the replay. So the values are those the library's call computes (as chosen for a call that requires grad),
and grouped-query attention runs on the unexpanded k and v, as SDPA with `enable_gqa` does. On an H200 at 8B shapes SDPA picks cuDNN, whose backward
takes 0.47 ms against flash attention's 0.79.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

COUNT = 5  # tensors recorded per attention call: q and k (after RoPE, or before q/k norms), v, the output, the LSE


def backend(query: Any, key: Any, value: Any, *, scale: float, implementation: str | None, mask: Any,
            cache: Any, dropout: float, packed: bool, causal: bool, extra: dict, norms_in_the_way: bool,
            rotary: int) -> str | None:
    """The operator that records the attention call on these [batch, heads, seq, dim] tensors ("flash" or
    "cudnn"), or None where it runs again in the replay. It records where the library would run causal SDPA
    over whole rows on a backend whose operator returns the log-sum-exp, and the replay can rebuild dq and dk
    from the recorded tensors alone (no q/k norm in the way, see attention.py; RoPE over the whole head)."""
    import torch
    from torch.nn.attention import SDPBackend

    if implementation != "sdpa" or mask is not None or cache is not None or dropout or packed or not causal:
        return None
    if any(v is not None for v in extra.values()) or norms_in_the_way or rotary != query.shape[-1]:
        return None
    if query.shape[-2] != key.shape[-2] or query.shape[-2] < 2 or query.shape[1] % key.shape[1]:
        return None
    if not query.is_floating_point() or torch.is_autocast_enabled(query.device.type) or not _operators():
        return None
    if query.is_cuda and query.shape[-1] % 8:  # SDPA pads such heads before the operator, which refuses them
        return None
    # Chosen as for a call that requires grad (the first forward runs without): some backends refuse the
    # backward of some head sizes on some GPUs, and SDPA picks another there.
    q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if choice == SDPBackend.FLASH_ATTENTION.value and query.device.type in ("cuda", "cpu"):
        return "flash"
    if choice == SDPBackend.CUDNN_ATTENTION.value and query.is_cuda:
        return "cudnn"
    return None


@functools.cache
def _operators() -> bool:
    """Whether this torch has the operators as called here (2.5 on): SDPA's choice with grouped-query
    attention, and cuDNN's attention returning the log-sum-exp on request."""
    import torch

    try:
        cudnn = str(torch.ops.aten._scaled_dot_product_cudnn_attention.default._schema)
        choice = torch._fused_sdp_choice
    except (AttributeError, RuntimeError):
        return False
    return "compute_log_sumexp" in cudnn and callable(choice) and hasattr(torch.nn.attention, "SDPBackend")


def _forward(backend: str, query: Any, key: Any, value: Any, scale: float) -> tuple[Any, Any]:
    import torch

    aten = torch.ops.aten
    if backend == "cudnn":
        return aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, True, False,
                                                         scale=scale)[:2]
    if query.is_cuda:
        return aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scale)[:2]
    return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scale)


def _backward(backend: str, grad: Any, query: Any, key: Any, value: Any, out: Any, lse: Any,
              scale: float) -> tuple[Any, ...]:
    import torch

    aten = torch.ops.aten
    if not query.is_cuda:
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, query, key, value, out, lse, 0.0,
                                                                          True, scale=scale)
    # Whole rows (no cumulative lengths) and no dropout: the random state is not read.
    seq, unused = query.shape[-2], torch.empty(0, dtype=torch.int64, device=query.device)
    if backend == "cudnn":
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad, query, key, value, out, lse, unused, unused, None, None, None, seq, seq, 0.0, True, scale=scale)
    return aten._scaled_dot_product_flash_attention_backward(
        grad, query, key, value, out, lse, None, None, seq, seq, 0.0, True, unused, unused, scale=scale)


def record(backend: str, query: Any, key: Any, value: Any, scale: float,
           before_norms: tuple[Any, Any] | None = None) -> tuple[Any, list[Any]]:
    """(the attention output as the library returns it, [batch, seq, heads, dim]; the tensors to record), by the
    operator `backend` names. `before_norms`: q and k as the projections gave them ([batch, seq, heads, dim]),
    kept instead of `query` and `key` where per-head norms came between."""
    out, lse = _forward(backend, query, key, value, scale)
    # Kept in [batch, seq, heads, dim] order, which is how the projections laid them out: no copies.
    q, k = before_norms or (query.transpose(1, 2), key.transpose(1, 2))
    return out.transpose(1, 2), [q, k, value.transpose(1, 2), out.transpose(1, 2), lse]


@functools.cache
def _function() -> type:
    import torch
    from torch.autograd.function import once_differentiable

    class RecordedAttention(torch.autograd.Function):
        """Attention of the projections' outputs (before RoPE) whose value was recorded: returns it, and its
        backward is the attention's and RoPE's."""

        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, cos: Any, sin: Any, scale: float, rope: Any, backend: str,
                    norms: tuple[Any, Any] | None, *recorded: Any) -> Any:
            ctx.save_for_backward(cos, sin, *recorded)
            ctx.scale, ctx.rope, ctx.backend, ctx.shapes = scale, rope, backend, (q.shape, k.shape, v.shape)
            ctx.norms = norms
            out = recorded[3]
            return out.reshape(*out.shape[:2], -1)

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
            cos, sin, query, key, value, out, lse = ctx.saved_tensors
            if ctx.norms is not None:  # kept before the norms: normed (with their graph) and rotated again
                with torch.enable_grad():
                    before = [t.detach().requires_grad_() for t in (query, key)]
                    normed = [norm(t) for norm, t in zip(ctx.norms, before)]
                # Copies: the Triton RoPE rotates in place, and the norms' graph must keep its outputs as made.
                query, key = (t.transpose(1, 2) for t in ctx.rope(
                    *(n.detach().transpose(1, 2).clone() for n in normed), cos, sin))
            grad = grad.reshape(out.shape).transpose(1, 2)
            dq, dk, dv = _backward(ctx.backend, grad, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                   out.transpose(1, 2), lse, ctx.scale)
            # RoPE's transpose is the rotation by minus the angle: cos and sin repeat across the head's two
            # halves (kernels/rope.py), so the rotation by -sin is the kernel's backward rotation.
            dq, dk = ctx.rope(dq, dk, cos, -sin)
            if ctx.norms is not None:
                dq, dk = (g.transpose(1, 2) for g in torch.autograd.grad(
                    normed, before, [g.transpose(1, 2) for g in (dq, dk)]))
            grads = [g.transpose(1, 2).reshape(shape) for g, shape in zip((dq, dk, dv), ctx.shapes)]
            return (*grads, None, None, None, None, None, None, *[None] * COUNT)

    return RecordedAttention


def replay(q: Any, k: Any, v: Any, cos: Any, sin: Any, scale: float, rope: Any, backend: str,
           recorded: Sequence[Any], norms: tuple[Any, Any] | None = None) -> Any:
    """The attention output `backend`'s operator recorded, [batch, seq, heads · dim], as a function of the
    projections' outputs `q`, `k`, `v` ([batch, seq, heads · dim], before RoPE; their values are not read).
    `norms`: the q and k norms between the projections and RoPE, whose inputs were recorded (`record`)."""
    return _function().apply(q, k, v, cos, sin, scale, rope, backend, norms, *recorded)
