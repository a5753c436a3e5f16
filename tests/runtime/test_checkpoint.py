"""Offloaded layer checkpointing computes the same gradients as no checkpointing."""
import torch
import transformers
from peft import LoraConfig, get_peft_model

from adapter_doctor.runtime import ensure_patched
from adapter_doctor.runtime.checkpoint import enable_offloaded_checkpointing

BATCH = torch.arange(2 * 12).reshape(2, 12) % 60 + 2


def lora_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(transformers.LlamaForCausalLM(config), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def grads(model):
    model.train()
    loss = model(input_ids=BATCH, labels=BATCH).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_checkpointing_matches_plain_training():
    loss, expected = grads(lora_llama())
    for patch in (False, True):
        model = lora_llama()
        if patch:
            ensure_patched(model)
        assert enable_offloaded_checkpointing(model) == 3
        got_loss, got = grads(model)
        assert torch.allclose(got_loss, loss)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7), name
