"""The causal LM head in training: the loss from hidden states by the fused linear cross-entropy, so the
full [tokens, vocab] logits are never built. Outside training, without labels, or with a head the fused loss
cannot compute exactly, the library's own forward runs."""
from __future__ import annotations

import dataclasses
from typing import Any

from adapter_doctor.kernels import causal_lm_labels

from .context import Context
from .eligibility import head_parts

_NOT_FOR_THE_BODY = ("labels", "logits_to_keep", "num_items_in_batch", "shift_labels")


def causal_lm_forward(self: Any, ctx: Context, *args: Any, **kwargs: Any) -> Any:
    kwargs = {**dict(zip(ctx.positional, args)), **kwargs}
    labels = kwargs.get("labels")
    head = _head(self) if labels is not None and self.training and kwargs.get("shift_labels") is None else None
    if head is None:
        return ctx.library_forward(self, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    weight, lora = head
    outputs = self.model(**{k: v for k, v in kwargs.items() if k not in _NOT_FOR_THE_BODY})
    hidden = outputs[0]
    loss = ctx.kernels.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, causal_lm_labels(labels).reshape(-1), ignore_index=-100,
        num_items_in_batch=kwargs.get("num_items_in_batch"), lora=lora,
        softcap=getattr(self.config, "final_logit_softcapping", None))
    # No logits in training with labels: building them is the memory this path exists to save.
    # The body's other outputs by this release's field names (the cache is `cache` in transformers 5,
    # `past_key_values` before), so no deprecated alias is read.
    names = [f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name not in ("loss", "logits")]
    rest = {name: outputs.get(name) for name in names}
    return CausalLMOutputWithPast(loss=loss, logits=None, **rest)


def _head(model: Any) -> tuple[Any, Any] | None:
    try:
        return head_parts(model.lm_head)
    except ValueError:  # a head with a bias, hooks, LoRA dropout...: the library's loss, unfused but exact
        return None
