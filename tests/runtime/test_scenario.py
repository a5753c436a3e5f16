"""The core scenario: an adapter trained under a class-patching runtime, reloaded with plain HF + PEFT.

The reload dies on its first forward with AttributeError: 'LlamaAttention' object has no attribute
'apply_qkv'. inspect_model must predict that before the forward runs; ensure_patched must repair the model
so training continues exactly as a clean process would run it.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import foreign_runtime
from adapter_doctor import ensure_patched, inspect_model
from adapter_doctor.runtime import save_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = torch.arange(2 * 16).reshape(2, 16) % 120 + 3


def tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


def train_steps(model, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def loss_and_grads(model) -> tuple[float, dict]:
    model.train()
    loss = model(input_ids=BATCH, labels=BATCH).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), grads


CLEAN = textwrap.dedent('''
    import sys, torch, transformers
    from peft import PeftModel
    base = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager")
    model = PeftModel.from_pretrained(base, sys.argv[2], is_trainable=True)
    model.train()
    batch = torch.arange(2 * 16).reshape(2, 16) % 120 + 3
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.save({"loss": loss.item(), "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad}},
               sys.argv[3])
''')


@pytest.fixture
def trained(tmp_path):
    """Train under the foreign runtime and save the base and the adapter, as its users do."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    with foreign_runtime.patched_classes():
        base = tiny_llama()
        base.save_pretrained(base_dir)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
        foreign_runtime.attach(model)
        train_steps(model)
        model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def test_reload_under_the_foreign_patch_is_predicted_and_repaired(trained, tmp_path):
    base_dir, adapter_dir = trained
    with foreign_runtime.patched_classes():
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)

        # 1. predicted before any forward runs
        broken = [f for f in inspect_model(model).findings if f.id == "ADC901"]
        assert len(broken) == 1
        assert "self.apply_o, self.apply_qkv" in broken[0].message and "2 LlamaAttention" in broken[0].message

        # 2. the failure as users meet it
        with pytest.raises(AttributeError, match="'LlamaAttention' object has no attribute 'apply_qkv'"):
            model(input_ids=BATCH, labels=BATCH)

        # 3. repaired: training continues as a clean process computes it
        report = ensure_patched(model)
        assert report.repaired, report
        assert not [f for f in inspect_model(model).findings if f.id == "ADC901"]
        loss, grads = loss_and_grads(model)

    clean_file = tmp_path / "clean.pt"
    subprocess.run([sys.executable, "-c", CLEAN, str(base_dir), str(adapter_dir), str(clean_file)], check=True,
                   capture_output=True)
    clean = torch.load(clean_file, weights_only=True)
    assert loss == pytest.approx(clean["loss"], rel=1e-5)
    assert grads.keys() == clean["grads"].keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, clean["grads"][name], rtol=1e-4, atol=1e-6), name

    # 4. adapters saved after the repair load in vanilla PEFT with identical logits
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=BATCH).logits
    saved = tmp_path / "resaved"
    save_adapter(model, saved)
    vanilla = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager"), str(saved))
    vanilla.eval()
    with torch.no_grad():
        assert torch.equal(vanilla(input_ids=BATCH).logits, ours)


def test_a_model_patched_by_us_survives_plain_peft(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    ensure_patched(model)
    train_steps(model)
    model.save_pretrained(tmp_path / "plain")  # plain PEFT save of a patched model
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=BATCH).logits
    fresh = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "plain"))
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=BATCH).logits, expected, rtol=1e-5, atol=1e-6)
    # and plain PEFT loading onto a base we patched first
    patched_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ensure_patched(patched_base)
    on_patched = PeftModel.from_pretrained(patched_base, str(tmp_path / "plain"))
    on_patched.eval()
    with torch.no_grad():
        assert torch.allclose(on_patched(input_ids=BATCH).logits, expected, rtol=1e-5, atol=1e-6)
