"""RMSNorm: y = x / sqrt(mean(x²) + eps) · (offset + w), normalised in fp32.

Llama-style norms (offset 0) cast the normalised input back to its dtype and then scale by the weight;
Gemma-style norms (offset 1, stored weight is w - 1) scale in fp32 and cast the product. Both orders are
kept because they round differently in bf16 and each must match its own architecture.

The Triton path saves x in its own dtype (no fp32 copy, no normalised output) and one fp32 rstd per row;
backward recomputes the normalised row from them. dW is summed per program, then across programs; with
`in_place`, dx takes dy's buffer.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ._triton import jit, lazy_functions, next_power_of_2, on_triton, program_count, row_warps

if TYPE_CHECKING:
    import torch

tl: Any = None  # triton.language, bound at the first launch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       scale_in_fp32: bool = False, in_place: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension; differentiable in `x` and `weight`. `in_place` is the Triton path's
    permission to reuse dy's buffer; autograd's own backward always allocates."""
    import torch

    dtype = x.dtype
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if scale_in_fp32:
        scale = weight.to(torch.float32)
        return (normed * (scale + offset if offset else scale)).to(dtype)
    return (weight + offset if offset else weight) * normed.to(dtype)


@jit
def _scale(w, offset, SCALE_IN_FP32: tl.constexpr):
    # Llama order adds the offset in the weight's own dtype (a torch op on the weight); Gemma's in fp32.
    scale = w.to(tl.float32) + offset
    if not SCALE_IN_FP32:
        scale = scale.to(w.dtype).to(tl.float32)
    return scale


@jit
def _rms_norm_forward_kernel(Y, X, W, RSTD, stride_y, stride_x, n_cols, eps, offset,
                             SCALE_IN_FP32: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    normed = x32 * rstd
    if not SCALE_IN_FP32:
        normed = normed.to(x.dtype).to(tl.float32)
    scale = _scale(tl.load(W + cols, mask=mask, other=0.0), offset, SCALE_IN_FP32)
    tl.store(Y + row * stride_y + cols, (normed * scale).to(Y.dtype.element_ty), mask=mask)


@jit
def _rms_norm_backward_kernel(DX, DY, X, W, RSTD, DW_PARTIAL, stride_dx, stride_dy, stride_x, n_rows, n_cols,
                              offset, rows_per_program, SCALE_IN_FP32: tl.constexpr, HAS_DW: tl.constexpr,
                              BLOCK: tl.constexpr):
    # Each program owns a contiguous run of rows; DX may be DY (each row is read whole before it is written).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    scale = _scale(tl.load(W + cols, mask=mask, other=0.0), offset, SCALE_IN_FP32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    x_ptr, dy_ptr, dx_ptr = X + start * stride_x + cols, DY + start * stride_dy + cols, DX + start * stride_dx + cols
    for row in range(start, tl.minimum(start + rows_per_program, n_rows)):
        dy = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr, mask=mask, other=0.0)
        rstd = tl.load(RSTD + row)
        normed = x.to(tl.float32) * rstd
        if HAS_DW:
            if SCALE_IN_FP32:
                dw += dy * normed
            else:
                dw += dy * normed.to(x.dtype).to(tl.float32)
        g = dy * scale
        dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / n_cols))
        tl.store(dx_ptr, dx.to(DX.dtype.element_ty), mask=mask)
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
    if HAS_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_forward(rows: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                     scale_in_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for a [rows, n] input with unit column stride: y [rows, n], rstd one fp32 value per row."""
    import torch

    n_rows, n_cols = rows.shape
    dtype = rows.dtype
    out_dtype = dtype if scale_in_fp32 else torch.promote_types(weight.dtype, dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=rows.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=rows.device)
    block = next_power_of_2(n_cols)
    _rms_norm_forward_kernel[(n_rows,)](y, rows, weight, rstd, y.stride(0), rows.stride(0), n_cols, eps,
                                        float(offset), SCALE_IN_FP32=scale_in_fp32, BLOCK=block,
                                        num_warps=row_warps(block))
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                      scale_in_fp32: bool, in_place: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx rows, dw). dx goes into dy's buffer when `in_place` allows it and dy is contiguous in x's dtype, or
    into the contiguous copy of dy this function had to make anyway."""
    import torch

    grad = _rows(dy)
    n_rows, n_cols = rows.shape
    copied = grad.data_ptr() != dy.data_ptr()
    reuse = grad.dtype == rows.dtype and (copied or (in_place and dy.is_contiguous()))
    dx = grad if reuse else torch.empty_like(rows)
    programs = program_count(rows.device, n_rows)
    partial = torch.empty((programs, n_cols) if need_dw else (1,), dtype=torch.float32, device=rows.device)
    block = next_power_of_2(n_cols)
    _rms_norm_backward_kernel[(programs,)](dx, grad, rows, weight, rstd, partial, dx.stride(0), grad.stride(0),
                                           rows.stride(0), n_rows, n_cols, float(offset),
                                           -(-n_rows // programs), SCALE_IN_FP32=scale_in_fp32, HAS_DW=need_dw,
                                           BLOCK=block, num_warps=row_warps(block))
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


@functools.cache
def _rms_norm_function() -> type:
    import torch

    class RMSNormFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                    scale_in_fp32: bool, in_place: bool) -> torch.Tensor:
            rows = _rows(x)
            y, rstd = rms_norm_forward(rows, weight, eps, offset, scale_in_fp32)
            ctx.save_for_backward(rows, weight, rstd)
            ctx.options = (x.shape, offset, scale_in_fp32, in_place)
            return y.view(x.shape)

        @staticmethod
        def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
            rows, weight, rstd = ctx.saved_tensors
            shape, offset, scale_in_fp32, in_place = ctx.options
            in_place = in_place and not torch.is_grad_enabled()  # a double backward may still read dy
            dx, dw = rms_norm_backward(dy, rows, weight, rstd, offset, scale_in_fp32, in_place,
                                       ctx.needs_input_grad[1])
            return dx.view(shape), dw, None, None, None, None

    return RMSNormFunction


__getattr__ = lazy_functions(__name__, RMSNormFunction=_rms_norm_function)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                    scale_in_fp32: bool = False, in_place: bool = False) -> torch.Tensor:
    """RMSNorm through the Triton kernels. `in_place=True` lets backward write dx into dy's buffer: only for a
    norm whose output feeds operations that hand back fresh gradients (projections), never for one whose output
    goes straight into a residual add, where dy is the very tensor the residual branch receives."""
    import torch

    if not torch.is_grad_enabled():  # nothing to record (a checkpoint's first forward): no Function
        return rms_norm_forward(_rows(x), weight, eps, offset, scale_in_fp32)[0].view(x.shape)
    return _rms_norm_function().apply(x, weight, eps, offset, scale_in_fp32, in_place)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             scale_in_fp32: bool = False, in_place: bool = False) -> torch.Tensor:
    """RMSNorm through the fastest implementation available for `x`'s device (the reference on CPU)."""
    if on_triton(x, weight):
        return rms_norm_triton(x, weight, eps, offset, scale_in_fp32, in_place)
    return rms_norm_reference(x, weight, eps, offset, scale_in_fp32)
