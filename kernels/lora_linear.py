"""LoRA linear: y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ, without ever forming W + s·B·A.

The fused path computes several projections of one input (q/k/v, gate/up) in one autograd Function: one GEMM
of x with the A's stacked, and what it saves is x, once, the rank-r products x·Aᵀ and the adapters' casts
(below); never a copy of x per projection, nor the fp32 copy of x that PEFT's order makes for fp32 adapters on a
bf16 base. Every GEMM is cuBLAS, and the scaled low-rank term is added into the base output by addmm (its
beta=1 epilogue), so there is no Triton kernel here. Backward computes dx (summed over the projections in one
buffer), dA and dB; W is frozen, and gets dW only if it requires grad. The low-rank operands run in x's dtype:
the forward casts the adapters once and saves the casts (parameter-sized, a few MB a layer), so that the backward
does not cast them again. Adapter gradients are accumulated in fp32 and returned in the adapters' dtype.

The kernels know nothing of PEFT: they take `LoraParts`. Which layers may run here, and their parts, the
runtime decides (`runtime/eligibility.py`).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from ._triton import autocast_on, lazy_functions

if TYPE_CHECKING:
    import torch


class LoraParts(NamedTuple):
    weight: torch.Tensor  # [out, in], the frozen base weight
    bias: torch.Tensor | None
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scaling: float


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Base projection plus the low-rank update, in the order and dtypes PEFT uses (x is cast to A's dtype)."""
    import torch.nn.functional as F

    out = F.linear(x, weight, bias)
    low = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling
    return (out + low).to(out.dtype)


def lora_multi_linear_reference(x: torch.Tensor, parts_list: Sequence[LoraParts]) -> list[torch.Tensor]:
    """One `lora_linear_reference` per projection of the same input."""
    return [lora_linear_reference(x, *parts) for parts in parts_list]


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32, without an fp32 copy of a large operand where cuBLAS can do it."""
    import torch

    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm's out_dtype
            pass
    return torch.mm(a, b).float()


class LowRank(NamedTuple):
    """The adapters of a group of projections in the input's dtype: the A's stacked, and each B."""
    stacked_a: torch.Tensor  # [sum of ranks, in]
    bs: list[torch.Tensor]  # [out, r] each


def _cast_stacked(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    # Cat first, then cast: CUDA's cat writes inputs of the output's dtype in one launch, but copies one input
    # at a time where it must also cast them, so this is two launches for any number of adapters.
    import torch

    return torch.cat(tensors).to(dtype)


def low_rank(parts_list: Sequence[Any], dtype: torch.dtype) -> LowRank:
    """The A's stacked and the B's in `dtype`, in few launches: one stack of the A's, and one of the B's where
    they need a cast and share a rank (each B is then a block of rows of it), each cast once."""
    a_s, bs = [p.lora_a for p in parts_list], [p.lora_b for p in parts_list]
    stacked = a_s[0].to(dtype) if len(a_s) == 1 else _cast_stacked(a_s, dtype)
    if len(bs) > 1 and any(b.dtype != dtype for b in bs) and len({b.shape[1] for b in bs}) == 1:
        return LowRank(stacked, list(_cast_stacked(bs, dtype).split([b.shape[0] for b in bs])))
    return LowRank(stacked, [b.to(dtype) for b in bs])


def scaled_dxa(dys: Sequence[torch.Tensor | None], xa: torch.Tensor, parts_list: Sequence[Any],
               low: LowRank) -> torch.Tensor:
    """d(x·Aᵀ) of every projection side by side: s·dY·B where dY exists, zeros where it does not."""
    import torch

    pieces = [xa.new_zeros((xa.shape[0], p.lora_a.shape[0])) if dy is None else torch.mm(dy, b).mul_(p.scaling)
              for dy, p, b in zip(dys, parts_list, low.bs)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def lora_multi_forward(x: torch.Tensor, parts_list: Sequence[LoraParts],
                       low: LowRank) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(outputs, x·Aᵀ of every projection side by side): one GEMM of x with all the A's stacked, then per
    projection the base GEMM (bias in its epilogue) and the scaled low-rank product added into it by addmm."""
    import torch

    dtype, rows = x.dtype, x.reshape(-1, x.shape[-1])
    xa = rows @ low.stacked_a.T  # [rows, sum of ranks]: the only activation saved besides x
    outputs = []
    for p, b, cols in zip(parts_list, low.bs, rank_columns(parts_list)):
        # Written through a 2-D view of a fresh tensor, so that each output is a tensor of its own (not a view),
        # which later in-place kernels (RoPE on q and k) may update.
        y = torch.empty((*x.shape[:-1], p.weight.shape[0]), dtype=dtype, device=x.device)
        flat = y.view(-1, y.shape[-1])
        if p.bias is None:
            torch.mm(rows, p.weight.T, out=flat)
        else:
            torch.addmm(p.bias, rows, p.weight.T, out=flat)
        flat.addmm_(xa[:, cols], b.T, alpha=p.scaling)
        outputs.append(y)
    return outputs, xa


def lora_multi_backward(dys: Sequence[torch.Tensor | None], rows: torch.Tensor, xa: torch.Tensor,
                        parts_list: Sequence[LoraParts], low: LowRank, need_x: bool,
                        need: Sequence[bool]) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(dx rows, [dW, db, dA, dB per projection]); `need` has four flags per projection in that order, and a
    projection whose output got no gradient (dy None) gets None. dx = Σ dY·W + (Σ s·dY·B)·A accumulates in one
    buffer; dA for every projection comes from one GEMM of the stacked d(x·Aᵀ) with x."""
    grads: list[torch.Tensor | None] = [None] * (4 * len(parts_list))
    columns = rank_columns(parts_list)
    used = [i for i, dy in enumerate(dys) if dy is not None]
    dxa = scaled_dxa(dys, xa, parts_list, low)
    dx = None
    for i in used:
        dy, p, cols = dys[i], parts_list[i], columns[i]
        need_w, need_b, _, need_lora_b = need[4 * i:4 * i + 4]
        if need_lora_b:
            grads[4 * i + 3] = mm_fp32(dy.T, xa[:, cols]).mul_(p.scaling).to(p.lora_b.dtype)
        if need_w:
            grads[4 * i] = (dy.T @ rows).to(p.weight.dtype)
        if need_b:
            grads[4 * i + 1] = dy.sum(0).to(p.bias.dtype)
        if need_x:
            dx = dy @ p.weight if dx is None else dx.addmm_(dy, p.weight)
    return lora_a_terms(dx, dxa, rows, parts_list, low, used, [4 * i + 2 for i in range(len(parts_list))], need,
                        grads), grads


def rank_columns(parts_list: Sequence[Any]) -> list[slice]:
    """Each projection's columns of x·Aᵀ with the As of `parts_list` stacked, in order."""
    columns, start = [], 0
    for p in parts_list:
        columns.append(slice(start, start + p.lora_a.shape[0]))
        start += p.lora_a.shape[0]
    return columns


def lora_a_terms(dx: torch.Tensor | None, dxa: torch.Tensor, rows: torch.Tensor, parts_list: Sequence[Any],
                 low: LowRank, used: Sequence[int], slots: Sequence[int], need: Sequence[bool],
                 grads: list[torch.Tensor | None]) -> torch.Tensor | None:
    """What every multi-projection LoRA backward ends with, given d(x·Aᵀ) of all projections side by side in
    `dxa`: each projection's dA (into `grads[slots[i]]`, where `need` asks) from one GEMM with x, and
    dx += d(x·Aᵀ)·A over the stacked As."""
    if any(need[slots[i]] for i in used):
        columns = rank_columns(parts_list)
        d_stacked = mm_fp32(dxa.T, rows)
        for i in used:
            if need[slots[i]]:
                grads[slots[i]] = d_stacked[columns[i]].to(parts_list[i].lora_a.dtype)
    if dx is not None:
        dx.addmm_(dxa, low.stacked_a)
    return dx


def placeholders(x: torch.Tensor, parts_list: Sequence[Any], low: LowRank) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(outputs, x·Aᵀ) for a call whose outputs nobody reads, only the gradients (`values=False`): each output a
    zero-stride view of one zero, its shape at no memory cost, and x·Aᵀ, all the backward needs."""
    xa = x.reshape(-1, x.shape[-1]) @ low.stacked_a.T
    return [x.new_zeros(()).expand(*x.shape[:-1], p.weight.shape[0]) for p in parts_list], xa


def unpack_saved(saved: Sequence[Any], count: int) -> tuple[Any, Any, LowRank, Sequence[Any]]:
    """(x, x·Aᵀ, the low-rank casts, the Function's tensor inputs) from what forward saved in that order."""
    x, xa, stacked, *rest = saved
    return x, xa, LowRank(stacked, list(rest[:count])), rest[count:]


def _parts(tensors: Sequence[Any], scalings: Sequence[float]) -> list[LoraParts]:
    return [LoraParts(*tensors[4 * i:4 * i + 4], s) for i, s in enumerate(scalings)]


@functools.cache
def _lora_function() -> type:
    import torch
    from torch.autograd.function import once_differentiable

    class LoraMultiLinearFunction(torch.autograd.Function):
        """Several LoRA projections of one input: x, x·Aᵀ and the adapters' casts are saved once for all of them."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, scalings: tuple[float, ...], values: bool,
                    *tensors: Any) -> tuple[torch.Tensor, ...]:
            parts_list = _parts(tensors, scalings)
            low = low_rank(parts_list, x.dtype)
            outputs, xa = lora_multi_forward(x, parts_list, low) if values else placeholders(x, parts_list, low)
            ctx.save_for_backward(x, xa, low.stacked_a, *low.bs, *tensors)
            ctx.set_materialize_grads(False)  # an unused projection's parameters then get None, as in PEFT
            ctx.scalings = scalings
            return tuple(outputs)

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, *dys: torch.Tensor) -> tuple[Any, ...]:
            x, xa, low, tensors = unpack_saved(ctx.saved_tensors, len(ctx.scalings))
            parts_list = _parts(tensors, ctx.scalings)
            rows = x.reshape(-1, x.shape[-1])
            dys = [None if dy is None else dy.reshape(-1, dy.shape[-1]) for dy in dys]
            dx, grads = lora_multi_backward(dys, rows, xa, parts_list, low, ctx.needs_input_grad[0],
                                            ctx.needs_input_grad[3:])
            return (None if dx is None else dx.view(x.shape), None, None, *grads)

    return LoraMultiLinearFunction


__getattr__ = lazy_functions(__name__, LoraMultiLinearFunction=_lora_function)


def lora_multi_linear_fused(x: torch.Tensor, parts_list: Sequence[LoraParts], values: bool = True) -> list[torch.Tensor]:
    """Several LoRA projections of `x` through one autograd Function (LoRA dropout must be 0: `lora_parts`
    refuses layers with dropout). W is frozen unless it requires grad, in which case dW is computed too.

    With `values=False` the outputs are zero-stride placeholders of the right shapes and no projection GEMM
    runs: for a recomputation whose caller already holds what the outputs fed (a residual sum) and needs only
    the backward (dx, dA, dB), which is exact."""
    import torch

    if not parts_list:
        return []
    if values and not torch.is_grad_enabled():  # nothing to record (a checkpoint's first forward): no Function
        return lora_multi_forward(x, parts_list, low_rank(parts_list, x.dtype))[0]
    tensors = [t for p in parts_list for t in (p.weight, p.bias, p.lora_a, p.lora_b)]
    return list(_lora_function().apply(x, tuple(float(p.scaling) for p in parts_list), values, *tensors))


def lora_linear_gradient_only_reference(x: torch.Tensor, parts_list: Sequence[LoraParts]) -> list[torch.Tensor]:
    """The reference stand-ins for projections whose values a recomputation does not need: the projections
    themselves (exact; they just do not save the GEMMs)."""
    return lora_multi_linear_reference(x, parts_list)


def lora_linear_gradient_only(x: torch.Tensor, parts_list: Sequence[LoraParts]) -> list[torch.Tensor] | None:
    """Placeholders for LoRA projections of `x` whose backward is the projections' own, in one Function; None
    where the fused Function cannot stand in (autocast would change the dtypes the backward assumes)."""
    if autocast_on(x.device):
        return None
    return lora_multi_linear_fused(x, parts_list, values=False)


def _fused_path(x: torch.Tensor) -> bool:
    # Under autocast the GEMMs would change dtype behind the in-place additions: the reference handles it.
    return x.is_cuda and not autocast_on(x.device)


def lora_multi_linear(x: torch.Tensor, parts_list: Sequence[LoraParts]) -> list[torch.Tensor]:
    """Several LoRA projections of the same input through the fastest implementation for `x`'s device."""
    if _fused_path(x):
        return lora_multi_linear_fused(x, parts_list)
    return lora_multi_linear_reference(x, parts_list)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA linear through the fastest implementation available for `x`'s device (the reference on CPU)."""
    if _fused_path(x):
        return lora_multi_linear_fused(x, [LoraParts(weight, bias, lora_a, lora_b, scaling)])[0]
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling)
