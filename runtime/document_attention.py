"""Self-attention restricted to each document of a packed batch.

The documents arrive as `cu_seq_lens` over the batch flattened row after row (`packing.Documents`). Three ways
to compute it, each exact up to its own rounding:

- "varlen": `torch.nn.attention.varlen.varlen_attn` (flash-attention) on the flattened tokens: CUDA, bf16/fp16,
  no softcapping;
- "flex": FlexAttention with a document mask (compiled once; CUDA), softcapping as a score modifier;
- "mask": a dense per-document causal mask in the configured implementation's format, through the library's
  own attention function (eager or SDPA). It supports everything the library does (dropout, softcapping,
  attention weights) and is the CPU path, the reference the others are tested against.

A sliding window counts within a document, as transformers counts it: key j is visible from query i when
i - window < j <= i.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable

FAST = ("varlen", "flex")  # tried in this order on CUDA (bench/packing_attention.py measures them)


def segment_starts(cu_seq_lens: Any, total: int) -> Any:
    """For each flattened token, the index of its document's first token."""
    import torch

    cu = cu_seq_lens.to(torch.long)
    lengths = cu.diff()
    return torch.repeat_interleave(cu[:-1], lengths, output_size=total)


def document_mask(cu_seq_lens: Any, rows: int, length: int, window: int | None = None) -> Any:
    """[rows, 1, length, length] bool, True where a query may attend to a key."""
    import torch

    device = cu_seq_lens.device
    starts = segment_starts(cu_seq_lens, rows * length).view(rows, length, 1)
    i = torch.arange(length, device=device).view(1, length, 1)
    j = torch.arange(length, device=device).view(1, 1, length)
    row_offset = (torch.arange(rows, device=device) * length).view(rows, 1, 1)
    allowed = (j <= i) & (row_offset + j >= starts)
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed.unsqueeze(1)


def _library(implementation: str, eager: Callable[..., Any] | None, softcap: Any) -> tuple[str, Callable[..., Any]]:
    """The library attention function the mask path calls, and the mask format it takes."""
    from .attention import attention_interface

    if (implementation == "eager" or softcap is not None) and eager is not None:
        return "eager", eager
    if softcap is not None:  # SDPA takes no softcap and would drop it without a word
        raise ValueError("attention logit softcapping in a packed batch needs the model's eager attention "
                         "function, and none was found")
    return "sdpa", attention_interface("sdpa", eager)


def by_mask(module: Any, query: Any, key: Any, value: Any, cu_seq_lens: Any, *, implementation: str,
            eager: Callable[..., Any] | None, scaling: float, dropout: float, window: int | None, softcap: Any,
            kwargs: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    rows, _, length, _ = query.shape
    allowed = document_mask(cu_seq_lens, rows, length, window)
    kind, interface = _library(implementation, eager, softcap)
    if kind == "eager":  # eager adds its mask to the scores, as transformers' eager mask does
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
    else:
        mask = allowed
    extra = {"softcap": softcap} if softcap is not None else {}
    return interface(module, query, key, value, mask, dropout=dropout, scaling=scaling, sliding_window=window,
                     **extra, **kwargs)


@functools.cache
def _varlen() -> tuple[Callable[..., Any], frozenset[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def by_varlen(query: Any, key: Any, value: Any, cu_seq_lens: Any, max_length: int, *, scaling: float,
              window: int | None) -> Any | None:
    """[rows, length, heads, head_dim], or None when this torch's varlen_attn cannot compute it."""
    import torch

    found = _varlen()
    if found is None:
        return None
    varlen_attn, params = found
    rows, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(rows * length, heads, head_dim)
    k = key.transpose(1, 2).reshape(rows * length, kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(rows * length, kv_heads, head_dim)
    options: dict[str, Any] = {"scale": scaling}
    if "window_size" in params:
        options["window_size"] = (window - 1 if window is not None else -1, 0)
    elif "is_causal" in params and (window is None or window >= max_length):
        options["is_causal"] = True
    else:
        return None
    if kv_heads != heads:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:  # older releases check for equal head counts
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    out = varlen_attn(q, k, v, cu, cu, max_length, max_length, **options)
    return out.view(rows, length, heads, head_dim)


@functools.cache
def _compiled_flex() -> Callable[..., Any] | None:
    try:
        import torch
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False)


_BLOCK_MASKS: list[tuple[Any, tuple[Any, ...], Any]] = []  # the last few (cu_seq_lens ref, key, mask): one per step


def flex_block_mask(cu_seq_lens: Any, rows: int, length: int, window: int | None) -> Any:
    """The block mask of this layout, built once for all the layers of a forward (and its recomputation)."""
    key = (cu_seq_lens._version, rows, length, window)
    for ref, known, mask in _BLOCK_MASKS:
        if ref() is cu_seq_lens and known == key:
            return mask
    mask = _build_block_mask(cu_seq_lens, rows, length, window)
    _BLOCK_MASKS[:] = [*_BLOCK_MASKS[-3:], (weakref.ref(cu_seq_lens), key, mask)]
    return mask


def _build_block_mask(cu_seq_lens: Any, rows: int, length: int, window: int | None) -> Any:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    starts = segment_starts(cu_seq_lens.to(torch.long), rows * length).view(rows, length)
    offsets = (torch.arange(rows, device=starts.device) * length).view(rows, 1)
    local_starts = starts - offsets  # each token's document start within its row

    def document_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        visible = (kv <= q) & (kv >= local_starts[b, q])
        return visible & (q - kv < window) if window is not None else visible

    return create_block_mask(document_causal, rows, None, length, length, device=starts.device)


@functools.cache
def _softcapping(softcap: float) -> Callable[..., Any]:
    """One score modifier per value, so the compiled FlexAttention is not traced again for every layer."""
    import torch

    def score_mod(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
        return torch.tanh(score / softcap) * softcap

    return score_mod


def by_flex(query: Any, key: Any, value: Any, block_mask: Any, *, scaling: float, softcap: Any) -> Any | None:
    flex = _compiled_flex()
    if flex is None:
        return None
    score_mod = _softcapping(float(softcap)) if softcap is not None else None
    out = flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
               enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


def attend(module: Any, query: Any, key: Any, value: Any, cu_seq_lens: Any, max_length: int | None, *,
           implementation: str, eager: Callable[..., Any] | None, scaling: float, dropout: float,
           window: int | None, softcap: Any, kwargs: dict[str, Any], backend: str | None = None) -> tuple[Any, Any]:
    """(output [rows, length, heads, head_dim], weights or None), as the library's attention functions return.

    `backend` forces one ("varlen", "flex", "mask"); by default the first of FAST that applies, else "mask"."""
    import torch

    fast_ok = query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0 \
        and not kwargs.get("output_attentions")
    order = (backend,) if backend else (FAST if fast_ok else ())
    rows, _, length, _ = query.shape
    if max_length is None:
        max_length = int(cu_seq_lens.diff().max())
    for name in order:
        out = None
        if name == "varlen" and softcap is None:
            out = by_varlen(query, key, value, cu_seq_lens, max_length, scaling=scaling, window=window)
        elif name == "flex":
            mask = flex_block_mask(cu_seq_lens, rows, length, window)
            out = by_flex(query, key, value, mask, scaling=scaling, softcap=softcap)
        if out is not None:
            return out, None
    return by_mask(module, query, key, value, cu_seq_lens, implementation=implementation, eager=eager,
                   scaling=scaling, dropout=dropout, window=window, softcap=softcap, kwargs=kwargs)
