"""Tiny random-initialised models of every supported architecture, built from configs (nothing downloaded)."""
from __future__ import annotations

import pytest

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256)
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
    # fused qkv_proj and gate_up_proj; half the head rotates (Phi-4-mini rotates three quarters)
    "phi3": ("Phi3Config", {"sliding_window": 8, "partial_rotary_factor": 0.5, "pad_token_id": 0,
                            "eos_token_id": 2}),
}
NO_SDPA = {"gemma2"}  # softcapping: transformers runs it eager only
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]


class Tiny:
    archs = list(ARCHS)
    targets = TARGETS

    @staticmethod
    def base(arch: str = "llama", attn: str = "eager", seed: int = 0, **overrides):
        import torch
        import transformers

        name, extra = ARCHS[arch]
        config = getattr(transformers, name)(**{**SIZES, **extra, **overrides})
        config._attn_implementation = attn
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        return model.float()

    @staticmethod
    def lora(model, seed: int = 1, **config):
        from peft import LoraConfig, get_peft_model

        options = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "lora_dropout": 0.0, **config}
        peft_model = get_peft_model(model, LoraConfig(**options))
        Tiny.randomise_lora(peft_model, seed)
        return peft_model

    @staticmethod
    def randomise_lora(model, seed: int = 1):
        import torch

        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "lora_magnitude" in name:
                    param.add_(0.2 * torch.randn(param.shape, generator=generator))

    @staticmethod
    def scale_lora(model, factor: float) -> None:
        """Every LoRA layer's scaling times `factor`: the function the model computes changes, its tensors not."""
        for m in model.modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "scaling", {}):
                m.scaling["default"] *= factor

    @staticmethod
    def batch(seed: int = 2, rows: int = 2, length: int = 13):
        import torch

        return torch.randint(3, 120, (rows, length), generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def run(model, ids, grad_of: str = "lora_"):
        """(logits, loss, {name: grad}) of one training step, gradients zeroed after."""
        import torch

        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.grad is not None and grad_of in n}
        model.zero_grad(set_to_none=True)
        # With labels in training the patched head returns only the loss (no [tokens, vocab] logits): the
        # logits come from a second forward without labels.
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        return logits.detach(), out.loss.detach(), grads

    @staticmethod
    def rel(a, b) -> float:
        """max |a - b| / max |b|: the error relative to the tensor's scale."""
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture
def tiny() -> type[Tiny]:
    return Tiny


def pytest_generate_tests(metafunc) -> None:
    # Any test taking `arch` runs on every supported architecture; `arch_attn` adds each attention function.
    if "arch" in metafunc.fixturenames:
        metafunc.parametrize("arch", list(ARCHS))
    if "arch_attn" in metafunc.fixturenames:
        metafunc.parametrize("arch_attn", [(a, attn) for a in ARCHS for attn in ("eager", "sdpa")
                                           if not (attn == "sdpa" and a in NO_SDPA)], ids=lambda p: "-".join(p))
