"""Gated activations of the MLP: act(gate) · up, with SiLU (SwiGLU) or GELU (GeGLU).

The Triton path saves gate and up only (not act(gate)); backward recomputes the activation and writes
d(gate) and d(up) into gate's and up's own buffers when those are intermediate results (the projections'
outputs), which nothing reads after this backward. It bumps their version counters, so a backward that did
save them fails loudly instead of reading gradients.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ._triton import jit, lazy_functions, on_triton, tanh_and_sech2

if TYPE_CHECKING:
    import torch

tl: Any = None  # triton.language, bound at the first launch

SILU, GELU_TANH, GELU_ERF = 0, 1, 2
_GELU = {"tanh": GELU_TANH, "none": GELU_ERF}
_BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up."""
    import torch.nn.functional as F

    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate) · up; "tanh" is Gemma's gelu_pytorch_tanh, "none" the exact erf form."""
    import torch.nn.functional as F

    return F.gelu(gate, approximate=approximate) * up


@jit
def _activation(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        e = tl.exp(-tl.abs(g))  # never overflows, for either sign of g
        sig = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        k0 = 0.7978845608028654  # sqrt(2 / pi)
        inner = k0 * (g + 0.044715 * g * g * g)
        t, sech2 = tanh_and_sech2(inner)
        d_inner = k0 * (1.0 + 3.0 * 0.044715 * g * g)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * sech2 * d_inner
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * g * g)  # 1 / sqrt(2 pi)
        return g * cdf, cdf + g * pdf


@jit
def _gated_forward_kernel(Y, G, U, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(g, ACT)
    tl.store(Y + offsets, (act * u).to(Y.dtype.element_ty), mask=mask)


@jit
def _gated_backward_kernel(DG, DU, DY, G, U, n, ACT: tl.constexpr, NEED_DG: tl.constexpr, NEED_DU: tl.constexpr,
                           BLOCK: tl.constexpr):
    # DG may be G and DU may be U: every element is loaded before the stores that overwrite it.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _activation(g, ACT)
    if NEED_DG:
        tl.store(DG + offsets, (dy * u * d_act).to(DG.dtype.element_ty), mask=mask)
    if NEED_DU:
        tl.store(DU + offsets, (dy * act).to(DU.dtype.element_ty), mask=mask)


def gated_forward(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    """act(gate) · up for contiguous gate and up of one shape."""
    import torch

    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = gate.numel()
    _gated_forward_kernel[(-(-n // _BLOCK),)](y, gate, up, n, ACT=act, BLOCK=_BLOCK, num_warps=4)
    return y


def gated_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int, need: tuple[bool, bool],
                   in_place: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d gate, d up), each None when not needed; written into gate's / up's buffer where `in_place` says."""
    import torch

    dy = dy.contiguous()
    dg = (gate if in_place[0] else torch.empty_like(gate)) if need[0] else None
    du = (up if in_place[1] else torch.empty_like(up)) if need[1] else None
    n = gate.numel()
    _gated_backward_kernel[(-(-n // _BLOCK),)](dg if need[0] else dy, du if need[1] else dy, dy, gate, up, n,
                                               ACT=act, NEED_DG=need[0], NEED_DU=need[1], BLOCK=_BLOCK,
                                               num_warps=4)
    return dg, du


def _prepare(t: torch.Tensor, other: torch.Tensor, in_place: bool) -> tuple[torch.Tensor, bool]:
    """(t laid out for the kernel, whether backward may overwrite it): a copy made here may always be; the
    caller's tensor only when it is an intermediate result (a leaf's data is the user's) sharing no memory with
    the other operand."""
    if not t.is_contiguous():
        return t.contiguous(), True
    shared = t.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()
    return t, in_place and t.grad_fn is not None and not shared


@functools.cache
def _gated_function() -> type:
    import torch
    from torch.autograd.function import once_differentiable
    from torch.autograd.graph import increment_version

    class GatedActivationFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: int, in_place: bool) -> torch.Tensor:
            (gate, reuse_gate), (up, reuse_up) = _prepare(gate, up, in_place), _prepare(up, gate, in_place)
            ctx.save_for_backward(gate, up)
            ctx.act, ctx.in_place = act, (reuse_gate, reuse_up)
            return gated_forward(gate, up, act)

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
            gate, up = ctx.saved_tensors
            need = tuple(ctx.needs_input_grad[:2])
            dg, du = gated_backward(dy, gate, up, ctx.act, need, ctx.in_place)
            for tensor, needed, reused in zip((gate, up), need, ctx.in_place):
                if needed and reused:  # a second backward here, or any other saver of it, now fails loudly
                    increment_version(tensor)
            return dg, du, None, None

    return GatedActivationFunction


__getattr__ = lazy_functions(__name__, GatedActivationFunction=_gated_function)


def _gated(gate: torch.Tensor, up: torch.Tensor, act: int, in_place: bool) -> torch.Tensor:
    import torch

    if not torch.is_grad_enabled():  # nothing to record (a checkpoint's first forward): no Function
        return gated_forward(gate.contiguous(), up.contiguous(), act)
    return _gated_function().apply(gate, up, act, in_place)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor, in_place: bool = True) -> torch.Tensor:
    """silu(gate) · up through the Triton kernels; see the module docstring for what `in_place` overwrites."""
    return _gated(gate, up, SILU, in_place)


def geglu_triton(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", in_place: bool = True) -> torch.Tensor:
    """gelu(gate) · up through the Triton kernels."""
    if approximate not in _GELU:
        raise ValueError(f"geglu: approximate must be 'tanh' or 'none', not {approximate!r}")
    return _gated(gate, up, _GELU[approximate], in_place)


def _same_layout(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.shape == up.shape and on_triton(gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU through the fastest implementation available for the inputs' device (the reference on CPU)."""
    return swiglu_triton(gate, up) if _same_layout(gate, up) else swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU through the fastest implementation available for the inputs' device (the reference on CPU)."""
    if _same_layout(gate, up) and approximate in _GELU:
        return geglu_triton(gate, up, approximate)
    return geglu_reference(gate, up, approximate)
