"""Which modules of each architecture the runtime patches, with what, and what that needs.

Architecture support is data: one row per module type, naming a shared implementation in `modules.py`,
the options that parameterise it, and the instance attributes it reads (verified before any swap).
Adding an architecture whose modules match an existing implementation is adding rows here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .options import AttentionOptions, DecoderOptions, MlpOptions, NormOptions

ATTENTION, MLP, NORM, DECODER, CAUSAL_LM = "attention", "gated_mlp", "rms_norm", "decoder_layer", "causal_lm"


@dataclass(frozen=True)
class ModuleSpec:
    class_name: str  # matched against the transformers classes in the instance's MRO
    implementation: str  # a key of modules.IMPLEMENTATIONS
    needs: tuple[str, ...]  # attributes the implementation reads from the instance
    options: object = field(default=None)  # the implementation's frozen options


LLAMA_NORM = NormOptions(eps_attr="variance_epsilon")
GEMMA_NORM = NormOptions(eps_attr="eps", offset=1.0, scale_in_fp32=True)  # stored weight is w - 1


def _attention_needs(options: AttentionOptions) -> tuple[str, ...]:
    projections = [options.fused_qkv] if options.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    needs = [*projections, "o_proj", "config", "layer_idx", "head_dim", "scaling", "attention_dropout",
             "num_key_value_groups"]
    needs += ["q_norm", "k_norm"] if options.qk_norm else []
    needs += [attr for _, attr in options.interface_kwargs if "." not in attr]
    return tuple(needs)


def _mlp_needs(options: MlpOptions) -> tuple[str, ...]:
    projections = (options.fused_gate_up,) if options.fused_gate_up else ("gate_proj", "up_proj")
    return (*projections, "down_proj", options.act_attr)


def _decoder_family(prefix: str, *, norm: NormOptions = LLAMA_NORM,
                    attention: AttentionOptions = AttentionOptions(),  # noqa: B008 - frozen, so shared safely
                    mlp: MlpOptions = MlpOptions(),  # noqa: B008
                    decoder: DecoderOptions = DecoderOptions()) -> tuple[ModuleSpec, ...]:  # noqa: B008
    norms = ("input_layernorm", "post_attention_layernorm")
    norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm") if decoder.sandwich_norm else ()
    return (
        ModuleSpec(f"{prefix}Attention", ATTENTION, _attention_needs(attention), attention),
        ModuleSpec(f"{prefix}MLP", MLP, _mlp_needs(mlp), mlp),
        ModuleSpec(f"{prefix}RMSNorm", NORM, ("weight", norm.eps_attr), norm),
        ModuleSpec(f"{prefix}DecoderLayer", DECODER, ("self_attn", "mlp", *norms), decoder),
        ModuleSpec(f"{prefix}ForCausalLM", CAUSAL_LM, ("model", "lm_head", "config")),
    )


ARCHITECTURES: dict[str, tuple[ModuleSpec, ...]] = {
    "llama": _decoder_family("Llama"),
    "mistral": _decoder_family("Mistral", attention=AttentionOptions(
        interface_kwargs=(("sliding_window", "config.sliding_window"),))),
    "qwen2": _decoder_family("Qwen2", attention=AttentionOptions(
        interface_kwargs=(("sliding_window", "sliding_window"),))),
    "qwen3": _decoder_family("Qwen3", attention=AttentionOptions(
        qk_norm=True, interface_kwargs=(("sliding_window", "sliding_window"),))),
    "gemma": _decoder_family("Gemma", norm=GEMMA_NORM),
    "gemma2": _decoder_family("Gemma2", norm=GEMMA_NORM, decoder=DecoderOptions(sandwich_norm=True),
                              attention=AttentionOptions(interface_kwargs=(
                                  ("sliding_window", "sliding_window"), ("softcap", "attn_logit_softcapping")))),
    # Gemma 3 text (Gemma3ForCausalLM): Gemma2's layer with Qwen3's q/k norms, local and global RoPE per layer,
    # and no attention softcapping (the library does not pass attn_logit_softcapping on).
    "gemma3_text": _decoder_family("Gemma3", norm=GEMMA_NORM,
                                   decoder=DecoderOptions(sandwich_norm=True, rope_by_layer_type=True),
                                   attention=AttentionOptions(qk_norm=True, interface_kwargs=(
                                       ("sliding_window", "sliding_window"),))),
    # Phi-3: Llama's layer with fused projections (qkv_proj, gate_up_proj), one window for every layer.
    "phi3": _decoder_family("Phi3", attention=AttentionOptions(
        fused_qkv="qkv_proj", interface_kwargs=(("sliding_window", "config.sliding_window"),)),
        mlp=MlpOptions(act_attr="activation_fn", fused_gate_up="gate_up_proj")),
}


def supported(model_type: str | None) -> bool:
    return model_type in ARCHITECTURES


def specs_for(model_type: str | None) -> tuple[ModuleSpec, ...]:
    """The specs of `model_type`, or () when the runtime does not support it."""
    return ARCHITECTURES.get(model_type or "", ())


def match(specs: tuple[ModuleSpec, ...], module: object) -> tuple[ModuleSpec, type] | None:
    """The spec whose transformers class is in `module`'s MRO (nearest first), and that class.

    Matching through the MRO also catches subclasses another runtime swapped in, and our own generated ones.
    """
    by_name = {spec.class_name: spec for spec in specs}
    for klass in type(module).__mro__:
        spec = by_name.get(klass.__name__)
        if spec is not None and (klass.__module__ or "").startswith("transformers."):
            return spec, klass
    return None
