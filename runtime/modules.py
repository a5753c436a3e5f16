"""The patched forwards shared by every architecture: RMSNorm, gated MLP and decoder layer (attention is in
`attention.py`). Each is `impl(self, ctx, *args, **kwargs)` and computes what the library's forward computes,
through the context's kernel set. Submodules are called as modules, so each runs its own (patched or not)
forward and hooks; only eligible LoRA projections are computed directly.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from .attention import attention_forward
from .causal_lm import causal_lm_forward
from .chunked_mlp import chunked_mlp
from .context import Context, named_arguments
from .projection import project_many
from .replay import output_projection, residual_add
from .tape import active


def rms_norm_forward(self: Any, ctx: Context, hidden_states: Any) -> Any:
    opts = ctx.options
    return ctx.kernels.rms_norm(hidden_states, self.weight, getattr(self, opts.eps_attr), opts.offset,
                                opts.scale_in_fp32)


@functools.cache
def _activation_types() -> dict[type, str]:
    import torch.nn as nn
    from transformers import activations

    kinds = {nn.SiLU: "silu", nn.GELU: "gelu"}
    for name, kind in (("SiLUActivation", "silu"), ("GELUTanh", "gelu_tanh"), ("GELUActivation", "gelu")):
        cls = getattr(activations, name, None)
        if cls is not None:
            kinds[cls] = kind
    return kinds


def gated_activation(act_fn: Any) -> tuple[str, str] | None:
    """("swiglu", "") or ("geglu", approximate) when a kernel computes `act_fn` exactly as it does, else None."""
    import torch.nn.functional as F

    kind = _activation_types().get(type(act_fn))
    inner = getattr(act_fn, "act", None)  # transformers' GELU classes may hold a Python formula instead
    if kind == "silu":
        return "swiglu", ""
    if kind == "gelu" and inner is None:  # torch.nn.GELU
        return "geglu", act_fn.approximate
    if kind == "gelu" and inner is F.gelu:
        return "geglu", "none"
    if kind == "gelu_tanh" and isinstance(inner, functools.partial) and inner.func is F.gelu \
            and inner.keywords == {"approximate": "tanh"}:
        return "geglu", "tanh"
    return None


def check_mlp(module: Any, options: Any) -> str | None:
    act_fn = getattr(module, options.act_attr, None)
    if gated_activation(act_fn) is None:
        return f"activation {type(act_fn).__name__} has no kernel"
    return None


def gated_mlp_forward(self: Any, ctx: Context, x: Any) -> Any:
    run = functools.partial(_gated_mlp, self, ctx)
    out = chunked_mlp(self, run, x)  # a long input inside a checkpoint, in chunks of tokens
    return run(x) if out is None else out


def _gated_mlp(self: Any, ctx: Context, x: Any) -> Any:
    kernels, opts = ctx.kernels, ctx.options
    act_fn = getattr(self, opts.act_attr)
    kind, approximate = gated_activation(act_fn) or ("", "")
    if opts.fused_gate_up:  # Phi-3: one projection, gate then up
        (gate_up,) = project_many((getattr(self, opts.fused_gate_up),), x, kernels)
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        gate, up = project_many((self.gate_proj, self.up_proj), x, kernels)
    if kind == "swiglu":
        hidden = kernels.swiglu(gate, up)
    elif kind == "geglu":
        hidden = kernels.geglu(gate, up, approximate)
    else:  # the activation changed after patching: compute it as the library does
        hidden = act_fn(gate) * up
    return output_projection(self.down_proj, hidden, kernels)


def check_decoder(module: Any, options: Any) -> str | None:
    # Phi-3's residual dropout sits between each sub-block and its residual sum; ours has none, so only p=0 fits.
    for name in ("resid_attn_dropout", "resid_mlp_dropout"):
        p = getattr(getattr(module, name, None), "p", 0.0)
        if p:
            return f"{name} has p={p}; the patched layer has no residual dropout"
    return None


def decoder_layer_forward(self: Any, ctx: Context, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs = named_arguments(ctx, args, kwargs)
    output_attentions = kwargs.get("output_attentions", False)
    sandwich = ctx.options.sandwich_norm
    tape = active()
    if tape is not None:  # inside a checkpoint: sub-block outputs feed the sums directly unless normed first
        tape.defer_outputs = not sandwich
    if ctx.options.rope_by_layer_type and "position_embeddings_local" in kwargs:
        local, global_ = kwargs.pop("position_embeddings_local"), kwargs.pop("position_embeddings_global", None)
        kwargs["position_embeddings"] = local if self.self_attn.is_sliding else global_
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, attn_weights = self.self_attn(hidden_states=hidden_states, **kwargs)
    if sandwich:
        hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = residual_add(residual, hidden_states, last=False)
    residual = hidden_states
    if sandwich:
        hidden_states = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden_states)))
    else:
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    hidden_states = residual_add(residual, hidden_states, last=True)
    if not ctx.returns_tuple:
        return hidden_states
    return (hidden_states, attn_weights) if output_attentions else (hidden_states,)


# implementation name -> (forward, check): check(module, the spec's options) returns why this instance cannot
# take it, or None.
IMPLEMENTATIONS: dict[str, tuple[Callable[..., Any], Callable[[Any, Any], str | None] | None]] = {
    "attention": (attention_forward, None),
    "gated_mlp": (gated_mlp_forward, check_mlp),
    "rms_norm": (rms_norm_forward, None),
    "decoder_layer": (decoder_layer_forward, check_decoder),
    "causal_lm": (causal_lm_forward, None),
}
