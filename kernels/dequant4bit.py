"""4-bit weights (bitsandbytes' nf4/fp4 layout) and LoRA linear on them: dequantize, base GEMM, low-rank update.

The layout, as bitsandbytes' `quantize_4bit` writes it: the weight [out, in] is flattened row-major; element i
is stored in byte i // 2, the even element in the high nibble and the odd one in the low nibble (an odd count
leaves the last low nibble as padding). A nibble indexes `code`, a 16-entry fp32 table (NormalFloat4 quantiles
or the fp4 values, both scaled to [-1, 1]). Elements are grouped in blocks of `blocksize` consecutive flat
indices, and each block's scale is `absmax[block]`: value = code[nibble] · absmax[block], in fp32, then rounded
to the compute dtype. Double quantization ("nested") stores absmax itself as uint8 indices into a 256-entry
table, in blocks of `nested_blocksize` with fp32 scales, minus the mean that `offset` adds back:
absmax[b] = nested_code[q[b]] · nested_absmax[b // nested_blocksize] + offset.

The LoRA Function dequantizes each base weight into one transient buffer per call, runs the cuBLAS GEMMs of the
bf16 path on it, and lets it go: the backward dequantizes again for dX = dY·W, so no dequantized weight is kept
between forward and backward, or across layers. That costs one dequantization pass per GEMM use (memory-bound,
a few percent of a layer's GEMM time at training batch sizes), against a GEMM with dequantization fused into its
operand load, which cuBLAS cannot do. Since the weight is written fresh each time anyway, a group of outputs
much wider than its input (the MLP's gate and up) gets the low-rank term folded into the base GEMM: the weight's
rows leave room for s·B, the input gets x·Aᵀ beside it (`low_rank_in_gemm`). The base GEMMs run in the layer's
compute dtype (x cast to it, the output cast back), as the base's own matmul does; the low-rank term runs in x's
dtype, so that an fp32 residual stream (prepare_model_for_kbit_training's) keeps PEFT's fp32 adapter arithmetic.
The adapters' casts to it are made once and saved for the backward (`lora_linear.low_rank`). Adapter gradients
accumulate in fp32.

The kernels know nothing of PEFT or bitsandbytes: they take `Packed4bit` and `Lora4bitParts` of plain tensors
and ints; `runtime/eligibility.py` reads them out of the layers.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from ._triton import autocast_on, jit, lazy_functions, on_triton
from .lora_linear import (
    LowRank,
    lora_a_terms,
    low_rank,
    mm_fp32,
    placeholders,
    rank_columns,
    scaled_dxa,
    unpack_saved,
)

if TYPE_CHECKING:
    import torch

tl: Any = None  # triton.language, bound at the first launch

BLOCK_OUTPUTS = 2048  # outputs per program, with 4 warps


class Packed4bit(NamedTuple):
    data: torch.Tensor  # packed bytes, any shape and storage dtype (viewed as uint8), ceil(n / 2) of them
    absmax: torch.Tensor  # [blocks] fp32 scales, or uint8 indices into nested_code when nested
    code: torch.Tensor  # [16] fp32
    blocksize: int
    shape: tuple[int, int]  # (out, in)
    nested_absmax: torch.Tensor | None = None  # [ceil(blocks / nested_blocksize)] fp32
    nested_code: torch.Tensor | None = None  # [256] fp32
    nested_blocksize: int = 0
    offset: torch.Tensor | None = None  # 0-dim fp32, added to every dequantized absmax

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


class Lora4bitParts(NamedTuple):
    weight: Packed4bit
    bias: torch.Tensor | None
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scaling: float
    compute_dtype: torch.dtype | None = None  # the base's matmul dtype; None: the input's


def absmax_reference(w: Packed4bit) -> torch.Tensor:
    """The fp32 scale of every block, undoing the double quantization where there is one."""
    if not w.nested:
        return w.absmax.float()
    scales = w.nested_absmax.float().repeat_interleave(w.nested_blocksize)[:w.absmax.numel()]
    return w.nested_code.float()[w.absmax.long()] * scales + w.offset.float()


def dequantize_4bit_reference(w: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight in `dtype`, from the format's definition (module docstring)."""
    import torch

    n = math.prod(w.shape)
    flat = w.data.reshape(-1).view(torch.uint8)
    nibbles = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1)[:n]
    scales = absmax_reference(w).repeat_interleave(w.blocksize)[:n]
    return (w.code.float()[nibbles.long()] * scales).to(dtype).reshape(w.shape)


@jit
def _dequant4bit_kernel(data_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
                        n, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                        BLOCK: tl.constexpr, ROW: tl.constexpr, ROW_STRIDE: tl.constexpr):
    # One program: BLOCK consecutive outputs, each reading its own byte (two neighbours read the same one, from
    # cache) and nibble, so the stores are contiguous with no interleaving of two halves. The block sizes
    # are compile-time constants: a division of 64-bit indices by a runtime value costs more than the rest of
    # the kernel; by a power of two it is a shift. So are the row length and the output's row stride, which
    # differ only where the rows leave room for more columns.
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = index < n
    packed = tl.load(data_ptr + index // 2, mask=live, other=0).to(tl.int32)
    nibble = tl.where(index % 2 == 0, packed >> 4, packed & 15)  # element 2i is byte i's high nibble
    block = index // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=live, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=live,
                                                       other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=live, other=0.0)
    values = tl.load(code_ptr + nibble) * scale
    dest = index if ROW == ROW_STRIDE else (index // ROW) * ROW_STRIDE + index % ROW
    tl.store(out_ptr + dest, values.to(out_ptr.dtype.element_ty), mask=live)


def _destination(w: Packed4bit, dtype: torch.dtype, out: torch.Tensor | None, row_stride: int | None) -> torch.Tensor:
    # `out` viewed as the rows the weight is written into: [out, row_stride], of which it fills the first `in`.
    import torch

    n_rows, n_cols = w.shape
    stride = n_cols if row_stride is None else row_stride
    if stride < n_cols:
        raise ValueError(f"row stride {stride} is shorter than the weight's rows ({n_cols})")
    if out is None:
        out = torch.empty(n_rows * stride, dtype=dtype, device=w.data.device)
    elif out.dtype != dtype or out.numel() < n_rows * stride or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of the requested dtype with room for the weight")
    return out.reshape(-1)[:n_rows * stride].view(n_rows, stride)


def dequantize_4bit_triton(w: Packed4bit, dtype: torch.dtype, out: torch.Tensor | None = None,
                           row_stride: int | None = None) -> torch.Tensor:
    """The [out, in] weight in `dtype` through the Triton kernel; written into `out` (contiguous, with room for
    out·row_stride elements, of `dtype`) when given. With `row_stride` the rows are that far apart and the
    result is the [out, row_stride] rows, of which the weight fills the first `in` columns: the kernel writes
    nothing to the others (uninitialised memory where `out` is not given)."""
    import torch

    if w.blocksize % 2:
        raise ValueError(f"blocksize {w.blocksize} is odd: a packed byte would straddle two blocks")
    n = math.prod(w.shape)
    rows = _destination(w, dtype, out, row_stride)
    data = w.data  # the kernel reads bytes from its first address: views only where they are not bytes yet
    if data.dtype != torch.uint8 or not data.is_contiguous():
        data = data.reshape(-1).view(torch.uint8)
    # ROW = ROW_STRIDE = 1 wherever the rows are contiguous, so that those launches share one compiled kernel
    nested, wide = w.nested, rows.shape[1] != w.shape[1]
    dummy = w.absmax  # any tensor on the device for the pointers a non-nested launch does not read
    grid = (-(-n // BLOCK_OUTPUTS),)  # ceil: the last program's outputs are masked
    # No fused multiply-add: the nested absmax is rounded after the product and after the offset, as
    # bitsandbytes rounds it (the interpreter ignores the option).
    _dequant4bit_kernel[grid](data, w.absmax, w.code, w.nested_absmax if nested else dummy,
                              w.nested_code if nested else dummy, w.offset if nested else dummy, rows, n,
                              BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize if nested else 1,
                              NESTED=nested, BLOCK=BLOCK_OUTPUTS, ROW=w.shape[1] if wide else 1,
                              ROW_STRIDE=rows.shape[1] if wide else 1, num_warps=4, enable_fp_fusion=False)
    return rows if row_stride is not None else rows.view(w.shape)


def dequantize_4bit(w: Packed4bit, dtype: torch.dtype, out: torch.Tensor | None = None,
                    row_stride: int | None = None) -> torch.Tensor:
    """The [out, in] weight in `dtype`, by the Triton kernel on CUDA tensors and the reference elsewhere
    (`dequantize_4bit_triton` says what `out` and `row_stride` do)."""
    if on_triton(w.data):
        return dequantize_4bit_triton(w, dtype, out, row_stride)
    weight = dequantize_4bit_reference(w, dtype)
    if out is None and row_stride is None:
        return weight
    rows = _destination(w, dtype, out, row_stride)
    rows[:, :w.shape[1]].copy_(weight)
    return rows if row_stride is not None else rows.view(w.shape)


def lora4bit_linear_reference(x: torch.Tensor, parts: Lora4bitParts) -> torch.Tensor:
    """What PEFT's LoRA layer on a bitsandbytes Linear4bit computes: the base in its compute dtype (x cast to
    it, the output cast back), then the low-rank term with x cast to A's dtype, cast to the base output's."""
    import torch.nn.functional as F

    w, bias, a, b, scaling, compute = parts
    compute = compute or x.dtype
    weight = dequantize_4bit_reference(w, compute)
    out = F.linear(x.to(compute), weight, None if bias is None else bias.to(compute)).to(x.dtype)
    low = F.linear(F.linear(x.to(a.dtype), a), b) * scaling
    return out + low.to(out.dtype)


def lora4bit_multi_linear_reference(x: torch.Tensor, parts_list: Sequence[Lora4bitParts]) -> list[torch.Tensor]:
    return [lora4bit_linear_reference(x, p) for p in parts_list]


def _scratch(parts_list: Sequence[Lora4bitParts], dtype: Any, device: Any, width: int | None = None) -> torch.Tensor:
    # One buffer the size of the group's largest weight (its rows `width` long where given), reused for each
    # weight in turn and freed with the call.
    import torch

    size = max(p.weight.shape[0] * (width or p.weight.shape[1]) for p in parts_list)
    return torch.empty(size, dtype=dtype, device=device)


FOLD_ALIGN = 8  # elements: cuBLAS's fast bf16/fp16 kernels want leading dimensions of a multiple of 16 bytes


def low_rank_in_gemm(parts_list: Sequence[Lora4bitParts], compute: Any, dtype: Any) -> bool:
    """Whether the forward folds the low-rank term into the base GEMM, [x | x·Aᵀ]·[W | s·B]ᵀ, instead of adding
    it to each output by addmm. That spares addmm's read and write of every output for one copy of x and a
    slightly longer reduction, so by that count it pays where the outputs together are at least twice as wide
    as x. Measured for an MLP's gate and up (7× on Llama-3.1-8B: the fold saves about a tenth of their GEMM
    time on an H200); a multi-head q/k/v group (3×) folds by the same count, unmeasured. The term must run in
    the base's dtype, so an fp32 input before a bf16 base (PEFT's fp32 adapter arithmetic) never folds."""
    return compute == dtype and sum(p.weight.shape[0] for p in parts_list) >= 2 * parts_list[0].weight.shape[1]


def lora4bit_forward(x: torch.Tensor, parts_list: Sequence[Lora4bitParts], compute: Any,
                     low: LowRank) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(outputs in x's dtype, x·Aᵀ of every projection side by side): one GEMM with the A's stacked, then per
    projection its weight dequantized into the scratch buffer and the base GEMM in the compute dtype (bias in
    its epilogue), the scaled low-rank product either added by addmm in x's dtype or folded into the GEMM
    (`low_rank_in_gemm`)."""
    import torch

    dtype, rows = x.dtype, x.reshape(-1, x.shape[-1])
    xa = rows @ low.stacked_a.T
    folded = low_rank_in_gemm(parts_list, compute, dtype)
    if folded:  # [x | x·Aᵀ | 0]; each weight's rows get s·B in its own rank columns and zeros in the rest
        pad = -(rows.shape[1] + xa.shape[1]) % FOLD_ALIGN
        width = rows.shape[1] + xa.shape[1] + pad
        rows_c = torch.cat((rows, xa, xa.new_zeros(xa.shape[0], pad)) if pad else (rows, xa), dim=1)
        scratch = _scratch(parts_list, compute, x.device, width)
    else:
        rows_c = rows if compute == dtype else rows.to(compute)  # transient: backward reads x itself
        scratch = _scratch(parts_list, compute, x.device)
    outputs = []
    for p, b, cols in zip(parts_list, low.bs, rank_columns(parts_list)):
        if folded:
            weight = dequantize_4bit(p.weight, compute, scratch, row_stride=width)
            tail = weight[:, rows.shape[1]:]
            if tail.shape[1] != b.shape[1]:  # other projections' rank columns, or padding
                tail.zero_()
            torch.mul(b, p.scaling, out=tail[:, cols])
        else:
            weight = dequantize_4bit(p.weight, compute, scratch)
        y = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=compute, device=x.device)
        flat = y.view(-1, y.shape[-1])
        if p.bias is None:
            torch.mm(rows_c, weight.T, out=flat)
        else:
            torch.addmm(p.bias.to(compute), rows_c, weight.T, out=flat)
        if compute != dtype:  # the base's output comes back in the input's dtype, as Linear4bit returns it
            y = y.to(dtype)
            flat = y.view(-1, y.shape[-1])
        if not folded:
            flat.addmm_(xa[:, cols], b.T, alpha=p.scaling)
        outputs.append(y)
    return outputs, xa


def lora4bit_backward(dys: Sequence[torch.Tensor | None], rows: torch.Tensor, xa: torch.Tensor,
                      parts_list: Sequence[Lora4bitParts], low: LowRank, compute: Any, need_x: bool,
                      need: Sequence[bool]) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(dx rows, [db, dA, dB per projection]); `need` has three flags per projection in that order. dx sums
    dY·W over the projections, each W dequantized again into one scratch buffer (the GEMM in the compute dtype,
    summed in x's), plus (Σ s·dY·B)·A."""
    dtype = rows.dtype
    grads: list[torch.Tensor | None] = [None] * (3 * len(parts_list))
    columns = rank_columns(parts_list)
    used = [i for i, dy in enumerate(dys) if dy is not None]
    dxa = scaled_dxa(dys, xa, parts_list, low)
    dx, scratch = None, _scratch(parts_list, compute, rows.device) if need_x and used else None
    for i in used:
        dy, p, cols = dys[i], parts_list[i], columns[i]
        need_b, _, need_lora_b = need[3 * i:3 * i + 3]
        if need_lora_b:
            grads[3 * i + 2] = mm_fp32(dy.T, xa[:, cols]).mul_(p.scaling).to(p.lora_b.dtype)
        if need_b:
            grads[3 * i] = dy.float().sum(0).to(p.bias.dtype)
        if need_x:
            weight = dequantize_4bit(p.weight, compute, scratch)
            if compute == dtype:
                dx = dy @ weight if dx is None else dx.addmm_(dy, weight)
            else:
                part = mm_fp32(dy.to(compute), weight).to(dtype)
                dx = part if dx is None else dx.add_(part)
    return lora_a_terms(dx, dxa, rows, parts_list, low, used, [3 * i + 1 for i in range(len(parts_list))], need,
                        grads), grads


@functools.cache
def _lora4bit_function() -> type:
    import torch
    from torch.autograd.function import once_differentiable

    class Lora4bitMultiLinearFunction(torch.autograd.Function):
        """Several LoRA projections of one input on 4-bit bases: saves x, x·Aᵀ and the adapters' casts, never a
        dequantized W."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, packed: tuple[Packed4bit, ...], scalings: tuple[float, ...],
                    compute: Any, values: bool, *tensors: Any) -> tuple[torch.Tensor, ...]:
            parts_list = _parts(packed, tensors, scalings)
            low = low_rank(parts_list, x.dtype)
            outputs, xa = lora4bit_forward(x, parts_list, compute, low) if values else placeholders(x, parts_list, low)
            ctx.save_for_backward(x, xa, low.stacked_a, *low.bs, *tensors)
            ctx.set_materialize_grads(False)
            ctx.packed, ctx.scalings, ctx.compute = packed, scalings, compute  # the base's own tensors
            return tuple(outputs)

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, *dys: torch.Tensor) -> tuple[Any, ...]:
            x, xa, low, tensors = unpack_saved(ctx.saved_tensors, len(ctx.scalings))
            parts_list = _parts(ctx.packed, tensors, ctx.scalings)
            rows = x.reshape(-1, x.shape[-1])
            dys = [None if dy is None else dy.reshape(-1, dy.shape[-1]) for dy in dys]
            dx, grads = lora4bit_backward(dys, rows, xa, parts_list, low, ctx.compute, ctx.needs_input_grad[0],
                                          ctx.needs_input_grad[5:])
            return (None if dx is None else dx.view(x.shape), None, None, None, None, *grads)

    return Lora4bitMultiLinearFunction


__getattr__ = lazy_functions(__name__, Lora4bitMultiLinearFunction=_lora4bit_function)


def _parts(packed: Sequence[Packed4bit], tensors: Sequence[Any], scalings: Sequence[float]) -> list[Lora4bitParts]:
    return [Lora4bitParts(w, *tensors[3 * i:3 * i + 3], s) for i, (w, s) in enumerate(zip(packed, scalings))]


def lora4bit_multi_linear_fused(x: torch.Tensor, parts_list: Sequence[Lora4bitParts],
                                values: bool = True) -> list[torch.Tensor]:
    """Several LoRA projections of `x` on 4-bit bases through one autograd Function: the base GEMMs in the
    bases' compute dtype (x cast to it, the outputs cast back, as the base layer does), the low-rank term in
    x's. The base weights are frozen; LoRA dropout must be 0. `values=False` gives zero-stride placeholders
    whose backward is exact (see `lora_linear.lora_multi_linear_fused`)."""
    import torch

    if not parts_list:
        return []
    compute = {p.compute_dtype or x.dtype for p in parts_list}
    if len(compute) != 1:
        raise ValueError(f"projections of one input in several compute dtypes: {sorted(map(str, compute))}")
    if values and not torch.is_grad_enabled():  # nothing to record (a checkpoint's first forward): no Function
        return lora4bit_forward(x, parts_list, compute.pop(), low_rank(parts_list, x.dtype))[0]
    tensors = [t for p in parts_list for t in (p.bias, p.lora_a, p.lora_b)]
    return list(_lora4bit_function().apply(x, tuple(p.weight for p in parts_list),
                                           tuple(float(p.scaling) for p in parts_list), compute.pop(), values,
                                           *tensors))


def _fused_path(x: torch.Tensor, parts_list: Sequence[Lora4bitParts]) -> bool:
    # The dequantization kernel runs on CUDA tensors; under autocast the reference follows autocast's dtypes.
    return x.is_cuda and not autocast_on(x.device) and all(on_triton(p.weight.data) for p in parts_list)


def lora4bit_multi_linear(x: torch.Tensor, parts_list: Sequence[Lora4bitParts]) -> list[torch.Tensor]:
    """Several LoRA projections of `x` on 4-bit bases, by the fastest implementation for `x`'s device."""
    if _fused_path(x, parts_list):
        return lora4bit_multi_linear_fused(x, parts_list)
    return lora4bit_multi_linear_reference(x, parts_list)


def lora4bit_gradient_only(x: torch.Tensor, parts_list: Sequence[Lora4bitParts]) -> list[torch.Tensor] | None:
    """Placeholders for projections whose values a recomputation does not need (no dequantization, no GEMM
    until the backward), in one Function; None where the fused Function cannot stand in."""
    if not _fused_path(x, parts_list):
        return None
    return lora4bit_multi_linear_fused(x, parts_list, values=False)
