"""A base described from its weights or, when only config.json is there, from the config alone, held against the
modules transformers really builds: every module PEFT could target, with its kind and sizes."""
from __future__ import annotations

from pathlib import Path

import pytest
from adapter_doctor.base_model import Module, load_base

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, tie_word_embeddings=False)
CONFIGS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma": {"head_dim": 8},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "decoder_sparse_step": 1,
                  "head_dim": 8, "mlp_only_layers": []},
}


def _live_modules(model) -> dict[str, Module]:
    """What PEFT can adapt in the live model, in the doctor's terms."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = Module("linear", module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Embedding):
            out[name] = Module("embedding", module.num_embeddings, module.embedding_dim)
        elif isinstance(module, Conv1D):
            out[name] = Module("conv1d", module.weight.shape[0], module.weight.shape[1])
        elif isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
            params = {p: tuple(getattr(module, p).shape) for p in ("gate_up_proj", "down_proj")}
            out[name] = Module("experts", None, None, params)
        elif isinstance(getattr(module, "weight", None), torch.nn.Parameter) and module.weight.dim() == 2 \
                and not list(module.children()) and "norm" not in type(module).__name__.lower():
            # transformers 5's MoE router: a 2-D weight that target_parameters adapts as a linear one
            out[name] = Module("linear", module.weight.shape[1], module.weight.shape[0])
    return out


def _config(kind: str):
    if kind == "gpt2":
        return transformers.AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    return transformers.AutoConfig.for_model(kind, **COMMON, **CONFIGS[kind])


@pytest.mark.parametrize("kind", [*CONFIGS, "gpt2"])
def test_a_base_from_its_config_alone_has_the_modules_transformers_builds(tmp_path: Path, kind: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind))
    saved, config_only = tmp_path / "saved", tmp_path / "config-only"
    model.save_pretrained(saved)
    config_only.mkdir()
    (config_only / "config.json").write_bytes((saved / "config.json").read_bytes())

    live = _live_modules(model)
    from_weights = load_base(saved, transformers.__version__)
    from_config = load_base(config_only, transformers.__version__)

    assert (from_weights.source, from_config.source) == ("weights", "config")
    assert from_weights.modules == live
    assert from_config.modules == live


def test_a_config_deeper_than_any_real_model_is_not_described(tmp_path: Path):
    config = _config("llama").to_dict() | {"num_hidden_layers": 10**7}
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    base = load_base(tmp_path, transformers.__version__)
    assert base.source == "config" and base.modules == {}


def test_an_architecture_without_a_template_is_not_guessed(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture", "hidden_size": 8}')
    base = load_base(tmp_path, transformers.__version__)
    assert base.source == "config" and base.modules == {}
