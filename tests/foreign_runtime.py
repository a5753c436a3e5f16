"""A stand-in for a fast runtime that patches classes, used only by the scenario tests.

Like the real one it replaces `LlamaAttention.forward` for the whole process, and its new forward calls
`self.apply_qkv(self, x)` and `self.apply_o(self, y)`, attributes that only its own loader gives to the
instances it builds. `patched_classes()` restores the class afterwards, so other tests are unaffected.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from transformers.models.llama import modeling_llama


def original_apply_qkv(self: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def original_apply_o(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.o_proj(x)


def fast_attention_forward(self: Any, hidden_states: torch.Tensor, position_embeddings: tuple, attention_mask: Any = None,
                           **kwargs: Any) -> tuple[torch.Tensor, Any]:
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = self.apply_qkv(self, hidden_states)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    cache = kwargs.pop("past_key_values", None) or kwargs.pop("past_key_value", None)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")})
    out, weights = modeling_llama.eager_attention_forward(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
    return self.apply_o(self, out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


@contextlib.contextmanager
def patched_classes() -> Iterator[None]:
    original = modeling_llama.LlamaAttention.__dict__["forward"]
    modeling_llama.LlamaAttention.forward = fast_attention_forward
    try:
        yield
    finally:
        modeling_llama.LlamaAttention.forward = original


def attach(model: Any) -> None:
    """What the runtime's own loader does: give its instances the attributes its forward needs."""
    for module in model.modules():
        if isinstance(module, modeling_llama.LlamaAttention):
            module.apply_qkv = original_apply_qkv
            module.apply_o = original_apply_o
