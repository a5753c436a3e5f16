"""A test-only stand-in for what Unsloth's Llama path does to transformers and PEFT, per release.

Built from reading the releases' sources (2025.11.1 with transformers 4.57, 2026.10.9 with transformers 5.x),
it makes the same assignments with minimal forwards of our own that read the same attributes the same way,
guarded or not, and follow the same calling convention:
- class forwards of LlamaAttention, LlamaDecoderLayer, LlamaModel, LlamaForCausalLM and
  PeftModelForCausalLM (the last wrapped by torch's `_disable_dynamo`, as the real one is), and
  LlamaForCausalLM.prepare_inputs_for_generation;
- the module-level LlamaRotaryEmbedding (so models built afterwards get the stand-in's class);
- 2026.10.9 gates every transformers class patch per instance on `_unsloth_fast_path` and reads
  apply_qkv / apply_o through getattr with a default; 2025.11.1 patches every instance and reads them bare.
`attach(model)` sets the instance attributes its loader and get_peft_model set (apply_qkv/apply_o hooks,
max_seq_length on every module, the shared rotary_emb on each attention, the fused LoRA MLP forward per
instance, and 2026.10.9's `_unsloth_fast_path` marks). The model body hands each layer the whole cached cos/sin
table, layers return tuples and attention a 3-tuple, unlike transformers.

Not imitated, because no model forward depends on them: the Trainer's training loop, compute_loss and
training_step (exec'd rewrites), torch's and transformers' checkpoint functions, the import-time patches to
accelerate, bitsandbytes, TRL and transformers' masking and sdpa functions, and 2026.10.9's torch.compile of
the decoder layer, which needs CUDA. The real package, all of it, runs on a GPU in test_unsloth_real.py.
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from peft import PeftModelForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama import modeling_llama

VERSIONS = ("2025.11.1", "2026.10.9")
_MISSING = object()


def _rope_base(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    return float(theta if theta is not None else config.rope_parameters["rope_theta"])


class RotaryTable(torch.nn.Module):
    """The whole cos/sin table for every position, built on first use on the device that asks for it (so a
    meta-device construction, as transformers 5 loads, leaves nothing uninitialised)."""

    def __init__(self, dim: int | None = None, max_position_embeddings: int = 2048, base: float = 10000.0,
                 device: Any = None, config: Any = None) -> None:
        super().__init__()
        if config is not None:
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            max_position_embeddings, base = config.max_position_embeddings, _rope_base(config)
        self.dim, self.base = dim, base
        self.current_rope_size = min(32768, max_position_embeddings)
        self.tables: dict[str, tuple[Any, Any]] = {}

    def get_cached(self, seq_len: int | None = None, device_index: Any = None) -> tuple[Any, Any]:
        """The whole table, whatever seq_len says."""
        device = torch.device(device_index) if isinstance(device_index, (str, torch.device)) else torch.device("cpu")
        if str(device) not in self.tables:
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float()
                                            / self.dim))
            positions = torch.arange(self.current_rope_size, dtype=torch.int64, device=device).float()
            table = torch.cat((torch.outer(positions, inv_freq),) * 2, dim=-1)
            self.tables[str(device)] = (table.cos(), table.sin())
        return self.tables[str(device)]

    def _table(self, x: Any) -> tuple[Any, Any]:
        return self.get_cached(None, x.device)


class RotaryTable2025(RotaryTable):
    def forward(self, x: Any, position_ids: Any = None, seq_len: int | None = None) -> tuple[Any, Any]:
        cos, sin = self._table(x)
        return cos[:seq_len].to(x.dtype), sin[:seq_len].to(x.dtype)  # ignores positions


class RotaryTable2026(RotaryTable):
    def forward(self, x: Any, position_ids: Any = None, seq_len: int | None = None) -> tuple[Any, Any]:
        cos, sin = self._table(x)
        if position_ids is not None and seq_len is None:  # the library's own call: per-position rows
            return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)
        return cos[:seq_len].to(x.dtype), sin[:seq_len].to(x.dtype)


def original_apply_qkv(self: Any, x: Any) -> tuple[Any, Any, Any]:
    return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def original_apply_o(self: Any, x: Any) -> Any:
    return self.o_proj(x)


def _lora_linear(proj: Any, x: Any) -> Any:
    """W x + s B A x from the layer's own parts, as the fused LoRA functions read them."""
    base = getattr(proj, "base_layer", proj)
    out = F.linear(x, base.weight, base.bias)
    if getattr(proj, "disable_adapters", True) or proj.merged:
        return out
    for name in getattr(proj, "active_adapters", ()):
        out = out + proj.lora_B[name](proj.lora_A[name](x)) * proj.scaling[name]
    return out


def apply_lora_qkv(self: Any, x: Any) -> tuple[Any, Any, Any]:
    return _lora_linear(self.q_proj, x), _lora_linear(self.k_proj, x), _lora_linear(self.v_proj, x)


def apply_lora_o(self: Any, x: Any) -> Any:
    return _lora_linear(self.o_proj, x)


def apply_lora_mlp(self: Any, x: Any) -> Any:
    return _lora_linear(self.down_proj, F.silu(_lora_linear(self.gate_proj, x)) * _lora_linear(self.up_proj, x))


def _rms(norm: Any, x: Any) -> Any:
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    x32 = x.float()
    return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(t: Any, cos: Any, sin: Any) -> Any:
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin


def _attend(q: Any, k: Any, v: Any, cos: Any, sin: Any, rows: Any, shape: tuple[int, int, int, int, int]) -> Any:
    bsz, q_len, n_heads, n_kv, head_dim = shape
    q = q.view(bsz, q_len, n_heads, head_dim).transpose(1, 2)
    k = k.view(bsz, q_len, n_kv, head_dim).transpose(1, 2)
    v = v.view(bsz, q_len, n_kv, head_dim).transpose(1, 2)
    cos, sin = cos[rows].to(q.dtype), sin[rows].to(q.dtype)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
    k, v = k.repeat_interleave(n_heads // n_kv, dim=1), v.repeat_interleave(n_heads // n_kv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim ** -0.5)
    return out.transpose(1, 2).reshape(bsz, q_len, n_heads * head_dim)


# The attention forwards read their instance attributes inline, as the real ones do: 2025.11.1 calls the
# loader's hooks bare, 2026.10.9 through getattr with a default; rotary_emb only when no table was passed.
def attention_2025(self: Any, hidden_states: Any, causal_mask: Any = None, attention_mask: Any = None,
                   position_ids: Any = None, past_key_value: Any = None, output_attentions: bool = False,
                   use_cache: bool = False, padding_mask: Any = None, position_embeddings: Any = None,
                   **kwargs: Any) -> tuple:
    if hasattr(self, "paged_attention"):  # inference buffers a training forward clears
        del self.paged_attention
    bsz, q_len, _ = hidden_states.size()
    shape = (bsz, q_len, self.config.num_attention_heads, self.config.num_key_value_heads, self.head_dim)
    q, k, v = self.apply_qkv(self, hidden_states)
    if position_embeddings:
        cos, sin = position_embeddings
    else:
        cos, sin = self.rotary_emb.get_cached(q_len, hidden_states.device)
    out = _attend(q, k, v, cos, sin, torch.arange(q_len, device=q.device), shape)  # rows by index, not position
    return self.apply_o(self, out), None, None


def attention_2026(self: Any, hidden_states: Any, causal_mask: Any = None, attention_mask: Any = None,
                   position_ids: Any = None, past_key_value: Any = None, output_attentions: bool = False,
                   use_cache: bool = False, padding_mask: Any = None, position_embeddings: Any = None,
                   **kwargs: Any) -> tuple:
    if hasattr(self, "paged_attention"):
        del self.paged_attention
    bsz, q_len, _ = hidden_states.size()
    shape = (bsz, q_len, self.config.num_attention_heads, self.config.num_key_value_heads, self.head_dim)
    q, k, v = getattr(self, "apply_qkv", original_apply_qkv)(self, hidden_states)
    if not position_embeddings or position_embeddings[0].shape[0] < q_len:
        position_embeddings = self.rotary_emb.get_cached(q_len, hidden_states.device)
    cos, sin = position_embeddings
    rows = position_ids if position_ids is not None else torch.arange(q_len, device=q.device)
    out = _attend(q, k, v, cos, sin, rows, shape)
    return getattr(self, "apply_o", original_apply_o)(self, out), None, None


def decoder_layer(self: Any, hidden_states: Any, causal_mask: Any = None, attention_mask: Any = None,
                  position_ids: Any = None, past_key_value: Any = None, output_attentions: bool = False,
                  use_cache: bool = False, padding_mask: Any = None, position_embeddings: Any = None,
                  **kwargs: Any) -> tuple:
    if use_cache and hasattr(self, "_flag_for_generation"):
        raise NotImplementedError("the stand-in imitates training only")
    residual = hidden_states
    hidden_states, _, _ = self.self_attn(hidden_states=_rms(self.input_layernorm, hidden_states),
                                         causal_mask=causal_mask, attention_mask=attention_mask,
                                         position_ids=position_ids, position_embeddings=position_embeddings)
    hidden_states = residual + hidden_states
    hidden_states = hidden_states + self.mlp(_rms(self.post_attention_layernorm, hidden_states))
    return (hidden_states,)


def model_body(self: Any, input_ids: Any = None, causal_mask: Any = None, attention_mask: Any = None,
               position_ids: Any = None, past_key_values: Any = None, inputs_embeds: Any = None,
               use_cache: Any = None, output_attentions: Any = None, output_hidden_states: Any = None,
               return_dict: Any = None, **kwargs: Any) -> Any:
    config = self.config
    hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    if hasattr(self, "max_seq_length"):
        hidden = hidden[:, : self.max_seq_length]
    if getattr(self, "_has_no_labels", False) and attention_mask is not None and self.training:
        hidden = hidden[:, : self.max_seq_length]  # the label-free (preference) path reads it bare
    if config.model_type == "gemma2":  # a branch llama never takes
        causal_mask = self.GA_mask
    cos, sin = self.rotary_emb.get_cached(max(hidden.shape[1], config.max_position_embeddings), hidden.device)
    for layer in self.layers:
        hidden = layer(hidden, causal_mask=causal_mask, attention_mask=None, position_ids=position_ids,
                       position_embeddings=(cos, sin))[0]
    hidden = self.final_layernorm(hidden) if config.model_type == "falcon_h1" else _rms(self.norm, hidden)
    return BaseModelOutputWithPast(last_hidden_state=hidden)


def causal_lm_fast_forward(inference: Any) -> Any:
    """The causal LM forward is built by a factory around its inference path, so it is a closure."""
    def causal_lm(self: Any, input_ids: Any = None, causal_mask: Any = None, attention_mask: Any = None,
                  position_ids: Any = None, past_key_values: Any = None, inputs_embeds: Any = None,
                  labels: Any = None, use_cache: Any = None, output_attentions: Any = None,
                  output_hidden_states: Any = None, return_dict: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            return inference(self, input_ids, past_key_values)
        self.model._has_no_labels = labels is None
        hidden = self.model(input_ids=input_ids, causal_mask=causal_mask, attention_mask=attention_mask,
                            position_ids=position_ids, inputs_embeds=inputs_embeds)[0]
        getattr(self, "accelerator_scaler", None)
        logits = F.linear(hidden, self.lm_head.weight).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
    return causal_lm


def _inference(self: Any, input_ids: Any, past_key_values: Any) -> Any:
    raise NotImplementedError(f"the stand-in imitates training only ({self.max_seq_length})")


def peft_forward(self: Any, input_ids: Any = None, causal_mask: Any = None, attention_mask: Any = None,
                 inputs_embeds: Any = None, labels: Any = None, output_attentions: Any = None,
                 output_hidden_states: Any = None, return_dict: Any = None, task_ids: Any = None,
                 num_logits_to_keep: int = 0, logits_to_keep: int = 0, **kwargs: Any) -> Any:
    return self.base_model(input_ids=input_ids, causal_mask=causal_mask, attention_mask=attention_mask,
                           inputs_embeds=inputs_embeds, labels=labels, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)


def prepare_inputs_for_generation(self: Any, input_ids: Any, **kwargs: Any) -> dict:
    return {"input_ids": input_ids[:, -1:] if kwargs.get("past_key_values") is not None else input_ids, **kwargs}


def _gate(fast: Any, original: Any) -> Any:
    @functools.wraps(fast)
    def gated(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_unsloth_fast_path", False):
            return fast(self, *args, **kwargs)
        return original(self, *args, **kwargs)
    return gated


def _assignments(version: str) -> list[tuple[Any, str, Any]]:
    attention = attention_2025 if version == "2025.11.1" else attention_2026
    rotary = RotaryTable2025 if version == "2025.11.1" else RotaryTable2026
    gated = version != "2025.11.1"
    classes = [(modeling_llama.LlamaAttention, "forward", attention),
               (modeling_llama.LlamaDecoderLayer, "forward", decoder_layer),
               (modeling_llama.LlamaModel, "forward", model_body),
               (modeling_llama.LlamaForCausalLM, "forward", causal_lm_fast_forward(_inference)),
               (modeling_llama.LlamaForCausalLM, "prepare_inputs_for_generation", prepare_inputs_for_generation)]
    if gated:
        classes = [(cls, name, _gate(fast, getattr(cls, name))) for cls, name, fast in classes]
    return classes + [(PeftModelForCausalLM, "forward", torch._disable_dynamo(peft_forward)),
                      (modeling_llama, "LlamaRotaryEmbedding", rotary)]


_ACTIVE: list[list[tuple[Any, str, Any, Any]]] = []  # (owner, name, old, new) per installed() in force


def _set(owner: Any, name: str, value: Any) -> None:
    if value is _MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, value)


@contextlib.contextmanager
def installed(version: str) -> Iterator[None]:
    """The release's process-wide assignments, undone on exit so other tests see the library as it is."""
    done: list[tuple[Any, str, Any, Any]] = []
    _ACTIVE.append(done)
    try:
        for owner, name, value in _assignments(version):
            done.append((owner, name, vars(owner).get(name, _MISSING), value))
            setattr(owner, name, value)
        yield
    finally:
        _ACTIVE.pop()
        for owner, name, old, _ in reversed(done):
            _set(owner, name, old)


@contextlib.contextmanager
def uninstalled() -> Iterator[None]:
    """The library as it is, for a while, inside installed(): what a fresh process would run."""
    done = _ACTIVE[-1]
    for owner, name, old, _ in reversed(done):
        _set(owner, name, old)
    try:
        yield
    finally:
        for owner, name, _, new in done:
            _set(owner, name, new)


def attach(model: Any, version: str, max_seq_length: int = 256) -> None:
    """What its loader and get_peft_model set on the instances they build."""
    body = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    for module in model.modules():
        module.max_seq_length = max_seq_length
        if version != "2025.11.1":
            module._unsloth_fast_path = True
    for layer in body.layers:
        attn = layer.self_attn
        attn.rotary_emb = body.rotary_emb
        fused = all(hasattr(getattr(attn, p), "lora_A") for p in ("q_proj", "k_proj", "v_proj"))
        attn.apply_qkv = apply_lora_qkv if fused else original_apply_qkv
        attn.apply_o = apply_lora_o if hasattr(attn.o_proj, "lora_A") else original_apply_o
        if all(hasattr(getattr(layer.mlp, p), "lora_A") for p in ("gate_proj", "up_proj", "down_proj")):
            layer.mlp.forward = types.MethodType(apply_lora_mlp, layer.mlp)
