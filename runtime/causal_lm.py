"""The causal LM head in training: the loss from hidden states by the fused linear cross-entropy, so the
full [tokens, vocab] logits are never built, and the output's `logits` is None. Outside training, without
labels, with a head the fused loss cannot compute exactly, or after `return_logits(model)`, the library's own
forward runs (with logits).

Every forward first looks for a packed batch (`packing.py`): when it finds one it hands the layout to the
layers as the flash-attention keywords, gives each document its own positions, ignores the targets that would
cross a boundary, and warns once if an attention module it did not patch would mix the documents anyway. For
a batch of one document a row on a library that would hand SDPA a full causal mask for it (transformers 4.57),
it passes a mask of ones instead, with which SDPA runs causal by itself (`packing.causal_mask_of_ones`)."""
from __future__ import annotations

import dataclasses
from typing import Any

from adapter_doctor.kernels import causal_lm_labels

from . import packing
from .context import Context
from .eligibility import head_parts

_NOT_FOR_THE_BODY = ("labels", "logits_to_keep", "num_items_in_batch", "shift_labels")


LOGITS = "_adapter_doctor_logits"  # instance flag set by return_logits()


def return_logits(model: Any, enabled: bool = True) -> int:
    """Opt in (or back out) to logits in training with labels, for code that reads them (metrics,
    distillation): the patched causal LMs in `model` then run the library's forward, which builds the full
    [tokens, vocab] logits, instead of the fused loss. Same loss, more memory. Returns how many LMs changed."""
    count = 0
    for module in model.modules():
        marker = getattr(type(module), "_adapter_doctor_patch", None)
        if marker is not None and marker.implementation == "causal_lm":
            if enabled:
                module.__dict__[LOGITS] = True
            else:
                module.__dict__.pop(LOGITS, None)
            count += 1
    return count


def causal_lm_forward(self: Any, ctx: Context, *args: Any, **kwargs: Any) -> Any:
    kwargs = {**dict(zip(ctx.positional, args)), **kwargs}
    documents = packing.find_documents(kwargs)
    if documents is not None:
        packing.check_once(self, kwargs, documents)
        kwargs = packing.with_documents(kwargs, documents)
    else:
        ones = packing.causal_mask_of_ones(self, kwargs)
        if ones is not None:
            kwargs = {**kwargs, "attention_mask": ones}
    labels = kwargs.get("labels")
    fused = labels is not None and self.training and kwargs.get("shift_labels") is None and not self.__dict__.get(LOGITS)
    head = _head(self) if fused else None
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
