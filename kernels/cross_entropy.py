"""Linear cross-entropy: the causal-LM loss from hidden states and the lm_head weight, never holding full logits.

Rows are processed in chunks whose logits fit `LOGITS_BUDGET` bytes. For each chunk a GEMM writes the logits
(in the hidden states' dtype, as the lm_head would), then one Triton program per row computes the logsumexp,
the row's loss and, in the same buffer, the gradient with respect to the logits (softmax - one-hot, divided by
the token count). The chunk's share of dh (and of dW, dA, dB when those are trained) is computed at once,
so the backward only hands out gradients: what outlives the forward is dh [N, H], plus dW when lm_head is
trained. The mean is HF's ForCausalLMLoss's: the sum over tokens whose label is not `ignore_index`, divided by
their count, or by `num_items_in_batch` when given (gradient accumulation).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ._triton import autocast_on, jit, lazy_functions, next_power_of_2, on_triton, row_warps, tanh_and_sech2
from .lora_linear import mm_fp32

if TYPE_CHECKING:
    import torch

tl: Any = None  # triton.language, bound at the first launch

LOGITS_BUDGET = 512 << 20  # bytes of one chunk's logits: 2,048 rows at vocab 128,256 in bf16
_MAX_BLOCK = 8192

Lora = tuple  # (lora_a [r, H], lora_b [V, r], scaling)


def causal_lm_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The target of every position as ForCausalLMLoss shifts them: the next label, `ignore_index` at the end."""
    import torch.nn.functional as F

    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                            ignore_index: int = -100, num_items_in_batch: Any = None, lora: Lora | None = None,
                            softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """The loss as HF computes it: logits from lm_head (PEFT's LoRA order), soft-capped in their dtype, cast to
    fp32, cross-entropy summed or averaged over labelled tokens. `labels` are already shifted."""
    import torch
    import torch.nn.functional as F

    logits = F.linear(hidden, weight)
    if lora is not None:
        lora_a, lora_b, scaling = lora
        low = F.linear(F.linear(hidden.to(lora_a.dtype), lora_a), lora_b) * scaling
        logits = (logits + low).to(logits.dtype)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float().reshape(-1, weight.shape[0])
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits, labels.reshape(-1).to(logits.device), ignore_index=ignore_index,
                           reduction=reduction)
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


@jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """(softcap · tanh(x / softcap), its derivative) in fp32; (x, 1) without a cap."""
    if HAS_SOFTCAP:
        t, sech2 = tanh_and_sech2(x / softcap)
        return softcap * t, sech2
    else:
        return x, 1.0


@jit
def _cross_entropy_forward_kernel(LOGITS, stride, LABELS, LOSS, DENOM, n_cols, ignore_index, softcap,
                                  HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    cols = tl.arange(0, BLOCK)
    label = tl.load(LABELS + row)
    top = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    for start in range(0, n_cols, BLOCK):  # online logsumexp: one read of the row
        mask = start + cols < n_cols
        x, _ = _capped(tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        x = tl.where(mask, x, float("-inf"))
        new_top = tl.maximum(top, tl.max(x, axis=0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), axis=0)
        top = new_top
    lse = top + tl.log(total)
    ignored = label == ignore_index
    valid = (label >= 0) & (label < n_cols)
    target, _ = _capped(tl.load(base + label, mask=valid & ~ignored, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - target))
    if COMPUTE_GRAD:  # second read of the row, writing d loss / d logits over it
        scale = tl.where(ignored, 0.0, 1.0 / tl.load(DENOM))
        for start in range(0, n_cols, BLOCK):
            offsets = start + cols
            mask = offsets < n_cols
            x, slope = _capped(tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            grad = (tl.exp(x - lse) - tl.where(offsets == label, 1.0, 0.0)) * scale * slope
            tl.store(base + offsets, grad.to(LOGITS.dtype.element_ty), mask=mask)


def cross_entropy_forward(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, denom: torch.Tensor,
                          ignore_index: int, softcap: float | None, compute_grad: bool) -> None:
    """Per-row losses into `losses`; with `compute_grad`, d(sum of losses / denom)/d(logits) over `logits`."""
    n_rows, n_cols = logits.shape
    block = min(next_power_of_2(n_cols), _MAX_BLOCK)
    _cross_entropy_forward_kernel[(n_rows,)](logits, logits.stride(0), labels, losses, denom, n_cols, ignore_index,
                                             float(softcap or 0.0), HAS_SOFTCAP=bool(softcap),
                                             COMPUTE_GRAD=compute_grad, BLOCK=block,
                                             num_warps=min(16, row_warps(block)))


def _denominator(labels: torch.Tensor, ignore_index: int, num_items_in_batch: Any) -> torch.Tensor:
    import torch

    if num_items_in_batch is None:
        return (labels != ignore_index).sum().to(torch.float32).reshape(1)
    return torch.as_tensor(num_items_in_batch, device=labels.device).to(torch.float32).reshape(1)


def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lora: Lora | None,
                                 ignore_index: int, num_items_in_batch: Any, softcap: float | None,
                                 chunk_rows: int | None, need: tuple[bool, bool, bool]) -> tuple[Any, ...]:
    """(loss, dh, dW, dA, dB) for hidden [N, H]; `need` says which of dh, dW and (dA, dB) to compute."""
    import torch

    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    labels = labels.reshape(-1).to(device)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    torch._assert_async(~bad.any(), "linear_cross_entropy: a label is outside the vocabulary")  # no host sync
    denom = _denominator(labels, ignore_index, num_items_in_batch)
    need_h, need_w, need_lora = need
    rows = chunk_rows or max(1, LOGITS_BUDGET // (vocab * hidden.element_size()))
    buffer = torch.empty((min(rows, n_rows), vocab), dtype=dtype, device=device)
    losses = torch.empty(n_rows, dtype=torch.float32, device=device)
    dh = torch.empty(hidden.shape, dtype=dtype, device=device) if need_h else None
    dw = torch.zeros_like(weight) if need_w else None  # accumulated in lm_head's dtype: no fp32 [V, H] copy
    if lora is not None:
        lora_a, lora_b, scaling = lora[0].to(dtype), lora[1].to(dtype), float(lora[2])
        ha = hidden @ lora_a.T  # [N, r]
        da = torch.zeros(lora_a.shape, dtype=torch.float32, device=device) if need_lora else None
        db = torch.zeros(lora_b.shape, dtype=torch.float32, device=device) if need_lora else None
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        h, logits = hidden[start:end], buffer[:end - start]
        torch.mm(h, weight.T, out=logits)
        if lora is not None:
            logits.addmm_(ha[start:end], lora_b.T, alpha=scaling)
        cross_entropy_forward(logits, labels[start:end], losses[start:end], denom, ignore_index, softcap, any(need))
        if need_h:
            torch.mm(logits, weight, out=dh[start:end])
        if lora is not None and (need_h or need_lora):
            grad_low = logits @ lora_b  # d loss / d (h·Aᵀ), before the scaling
            if need_h:
                dh[start:end].addmm_(grad_low, lora_a, alpha=scaling)
            if need_lora:
                db.add_(mm_fp32(logits.T, ha[start:end]), alpha=scaling)
                da.add_(mm_fp32(grad_low.T, h), alpha=scaling)
        if need_w:
            dw.addmm_(logits.T, h)
    loss = losses.sum() / denom[0]
    if lora is None or not need_lora:
        return loss, dh, dw, None, None
    return loss, dh, dw, da.to(lora[0].dtype), db.to(lora[1].dtype)


@functools.cache
def _cross_entropy_function() -> type:
    import torch
    from torch.autograd.function import once_differentiable

    class LinearCrossEntropyFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, lora_a: Any, lora_b: Any,
                    labels: torch.Tensor, options: tuple[Any, ...]) -> torch.Tensor:
            scaling, ignore_index, num_items_in_batch, softcap, chunk_rows = options
            lora = None if lora_a is None else (lora_a, lora_b, scaling)
            grads = ctx.needs_input_grad
            need = (grads[0], grads[1], grads[2] or grads[3])
            loss, *ctx.grads = linear_cross_entropy_forward(hidden.reshape(-1, hidden.shape[-1]), weight, labels,
                                                            lora, ignore_index, num_items_in_batch, softcap,
                                                            chunk_rows, need)
            ctx.hidden_shape = hidden.shape
            return loss

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
            if ctx.grads is None:
                raise RuntimeError("linear_cross_entropy: its gradients were computed in the forward and are handed "
                                   "out once; a second backward through the same loss is not supported")
            grads, ctx.grads = ctx.grads, None
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_loss)
            dh, dw, da, db = grads
            return None if dh is None else dh.view(ctx.hidden_shape), dw, da, db, None, None

    return LinearCrossEntropyFunction


__getattr__ = lazy_functions(__name__, LinearCrossEntropyFunction=_cross_entropy_function)


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                ignore_index: int = -100, num_items_in_batch: Any = None, lora: Lora | None = None,
                                softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """The loss through the chunked Triton path; without grad mode or anything to train it computes the loss
    alone (no gradient buffers)."""
    import torch

    lora_a, lora_b, scaling = lora if lora is not None else (None, None, 0.0)
    trained = [t is not None and t.requires_grad for t in (hidden, weight, lora_a, lora_b)]
    options = (scaling, ignore_index, num_items_in_batch, softcap, chunk_rows)
    if torch.is_grad_enabled() and any(trained):
        return _cross_entropy_function().apply(hidden, weight, lora_a, lora_b, labels, options)
    return linear_cross_entropy_forward(hidden.reshape(-1, hidden.shape[-1]), weight, labels, lora, ignore_index,
                                        num_items_in_batch, softcap, chunk_rows, (False, False, False))[0]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, num_items_in_batch: Any = None, lora: Lora | None = None,
                         softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden`·`weight`ᵀ (+ the LoRA term) against already shifted `labels`, through the
    fastest implementation for the inputs' device (the reference on CPU and under autocast)."""
    kwargs = dict(ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, lora=lora, softcap=softcap,
                  chunk_rows=chunk_rows)
    if on_triton(hidden, weight) and not autocast_on(hidden.device):
        return linear_cross_entropy_triton(hidden, weight, labels, **kwargs)
    return cross_entropy_reference(hidden, weight, labels, **kwargs)
