"""Options that parameterise the shared implementations, one frozen (hashable) type per implementation."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NormOptions:
    eps_attr: str  # the instance attribute holding eps
    offset: float = 0.0  # Gemma stores w - 1 and scales by 1 + w
    scale_in_fp32: bool = False  # Gemma scales before casting back, Llama after


@dataclass(frozen=True)
class AttentionOptions:
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    # Extra keyword arguments for the attention function: (name, instance attribute); "config.x" reads the
    # config and passes None when it lacks x (Mistral's sliding_window).
    interface_kwargs: tuple[tuple[str, str], ...] = ()
    # Phi-3: one projection for q, k and v, split by the config's head counts ("" for three projections)
    fused_qkv: str = ""


@dataclass(frozen=True)
class MlpOptions:
    # The activation is read from the instance: SwiGLU or GeGLU follows the checkpoint's config.
    act_attr: str = "act_fn"
    # Phi-3: one projection for gate and up, gate first ("" for two projections)
    fused_gate_up: str = ""


@dataclass(frozen=True)
class DecoderOptions:
    sandwich_norm: bool = False  # Gemma2: norms after attention and MLP as well as before
    # Gemma3 on transformers 4.x: the layer picks the local or global RoPE by its attention's `is_sliding`
    rope_by_layer_type: bool = False
