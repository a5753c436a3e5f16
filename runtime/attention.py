"""The patched self-attention shared by Llama, Mistral, Qwen2/3, Gemma/Gemma2/Gemma3 and Phi-3.

q/k/v/o go through the fused LoRA path when eligible (Phi-3's fused qkv_proj as one projection, split after),
RoPE through the kernel set; the attention itself is the model's configured function (eager, sdpa, flash...),
as the library calls it, except in a packed batch, where `document_attention` keeps each document to itself. The two transformers lines
differ in how the cache arrives (`past_key_value(s)` on 4.x, `cache` on 5.x) and how it is updated; both are
read from the objects at hand rather than from a version number.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from . import document_attention, saved_attention
from .context import Context
from .projection import gradient_only_many, project_many
from .replay import output_projection
from .tape import RECORD, REPLAY, active

_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


def attention_forward(self: Any, ctx: Context, hidden_states: Any, position_embeddings: Any = None,
                      attention_mask: Any = None, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    named = [kwargs.pop(name, None) for name in _CACHE_NAMES]  # every spelling leaves kwargs
    cache = next((c for c in (args[0] if args else None, *named) if c is not None), None)
    cache_position = kwargs.pop("cache_position", args[1] if len(args) > 1 else None)
    opts, kernels = ctx.options, ctx.kernels

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    tape = active()
    recorded = tape.next_attention() if tape is not None and tape.mode == REPLAY else None
    if recorded is not None:  # the forward kept what the attention's backward needs: no GEMMs, RoPE, attention
        q, k, v = _project_qkv(self, opts, hidden_states, kernels, values=False)
        cos, sin = position_embeddings
        kept, operator = recorded
        norms = (self.q_norm, self.k_norm) if opts.qk_norm else None
        output = saved_attention.replay(q, k, v, cos, sin, self.scaling, kernels.rope, operator, kept, norms)
        return output_projection(self.o_proj, output, kernels), None
    query, key, value = (t.view(hidden_shape) for t in _project_qkv(self, opts, hidden_states, kernels))
    value = value.transpose(1, 2)
    before_norms = normed = None
    if opts.qk_norm:
        before_norms = query, key
        query, key = normed = self.q_norm(query), self.k_norm(key)
    cos, sin = position_embeddings
    query, key = _rope(kernels, query.transpose(1, 2), key.transpose(1, 2), cos, sin)

    if cache is not None:
        key, value = update_cache(cache, key, value, self.layer_idx, sin, cos, cache_position, kwargs)

    implementation = self.config._attn_implementation
    extra = {name: _read(self, attr) for name, attr in opts.interface_kwargs}
    dropout = 0.0 if not self.training else self.attention_dropout
    documents = kwargs.get("cu_seq_lens_q")
    if tape is not None and tape.mode == RECORD:
        causal = getattr(self, "is_causal", True) and kwargs.get("is_causal") is not False
        operator = saved_attention.backend(
            query, key, value, scale=self.scaling, implementation=implementation, mask=attention_mask, cache=cache,
            dropout=dropout, packed=documents is not None, causal=causal, extra=extra, rotary=cos.shape[-1],
            norms_in_the_way=before_norms is not None and _in_the_way(self, before_norms, normed))
        if operator is None:
            tape.record_attention([], "")
        else:
            output, kept = saved_attention.record(operator, query, key, value, self.scaling, before_norms)
            tape.record_attention(kept, operator)
            return output_projection(self.o_proj, output.reshape(*input_shape, -1), kernels), None
    if documents is not None and key.shape[-2] == query.shape[-2] and "flash" not in (implementation or "") \
            and getattr(self, "is_causal", True):
        # A packed batch (packing.py found it): each query sees only its own document, whatever mask the
        # library built (it builds none, or a causal one over the whole row, when the forward makes a cache).
        output, weights = document_attention.attend(
            self, query, key, value, documents, kwargs.get("max_length_q"), implementation=implementation or "eager",
            eager=ctx.eager_attention, scaling=self.scaling, dropout=dropout, window=extra.get("sliding_window"),
            softcap=extra.get("softcap"), kwargs=kwargs)
    else:
        interface = attention_interface(implementation, ctx.eager_attention)
        output, weights = interface(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling,
                                    **extra, **kwargs)
    output = output.reshape(*input_shape, -1).contiguous()
    return output_projection(self.o_proj, output, kernels), weights


def _project_qkv(module: Any, opts: Any, x: Any, kernels: Any, values: bool = True) -> list[Any]:
    # values=False: placeholders whose backward is the projections' (a replay that reads only the gradients)
    run = project_many if values else gradient_only_many
    if not opts.fused_qkv:
        return run((module.q_proj, module.k_proj, module.v_proj), x, kernels)
    # One projection, split as the library splits it: all query heads, then key heads, then value heads.
    (qkv,) = run((getattr(module, opts.fused_qkv),), x, kernels)
    config = module.config
    q_size = config.num_attention_heads * module.head_dim
    kv_size = config.num_key_value_heads * module.head_dim
    # Slices, not split(): the Triton RoPE rotates q and k in place, which autograd allows on a slice but not
    # on the outputs of a function returning several views.
    return [qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]]


def _rope(kernels: Any, query: Any, key: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
    rotary = cos.shape[-1]
    if rotary == query.shape[-1]:
        return kernels.rope(query, key, cos, sin)
    # Partial rotary (Phi-3 with partial_rotary_factor < 1): the first `rotary` dims rotate, the rest pass.
    import torch

    q_rot, k_rot = kernels.rope(query[..., :rotary], key[..., :rotary], cos, sin)
    return torch.cat((q_rot, query[..., rotary:]), dim=-1), torch.cat((k_rot, key[..., rotary:]), dim=-1)


def _in_the_way(module: Any, before: tuple[Any, Any], after: tuple[Any, Any]) -> bool:
    """Whether the q/k norms keep the replay from skipping them: weights that train (the recorded attention's
    backward hands them no gradient), or a norm that gave back its input's storage (RoPE then rotated the
    tensors that would be recorded)."""
    if any(p.requires_grad for m in (module.q_norm, module.k_norm) for p in m.parameters()):
        return True
    return any(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for a, b in zip(after, before))


def _read(module: Any, attr: str) -> Any:
    if attr.startswith("config."):
        return getattr(module.config, attr.removeprefix("config."), None)
    return getattr(module, attr)


@functools.cache
def _takes_cache_kwargs(cache_type: type) -> bool:
    # 4.x caches take a cache_kwargs dict (sin, cos, cache_position); 5.x ones take the call's kwargs.
    try:
        return "cache_kwargs" in inspect.signature(cache_type.update).parameters
    except (TypeError, ValueError):
        return False


def update_cache(cache: Any, key: Any, value: Any, layer_idx: int, sin: Any, cos: Any, cache_position: Any,
                 kwargs: dict[str, Any]) -> tuple[Any, Any]:
    if _takes_cache_kwargs(type(cache)):
        return cache.update(key, value, layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
    return cache.update(key, value, layer_idx, kwargs=kwargs)


def attention_interface(implementation: str | None, eager: Callable[..., Any] | None) -> Callable[..., Any]:
    """The attention function the library would call for `implementation`, `eager` being its own fallback."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get_interface is not None:
        return get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
