"""The core scenario, against stand-ins of both Unsloth releases (tests/standins/unsloth.py): an adapter trained
under the patcher, reloaded in the same process with plain AutoModelForCausalLM + PeftModel.

2025.11.1 makes that reload die on its first forward with AttributeError: 'LlamaAttention' object has no
attribute 'apply_qkv'; 2026.10.9 gates its patches, so the reload trains. inspect_model must say exactly that
before anything runs, and ensure_patched must leave a model that trains as a clean process computes it, with
the patcher's own model too. The real packages run the same scenario on a GPU: test_unsloth_real.py.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from adapter_doctor import ensure_patched, inspect_model
from adapter_doctor.runtime import load, save_adapter, unpatch
from peft import LoraConfig, PeftModel, get_peft_model
from standins import unsloth

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = torch.arange(2 * 16).reshape(2, 16) % 120 + 3


def tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


def loss_and_grads(model) -> tuple[float, dict]:
    model.train()
    loss = model(input_ids=BATCH, labels=BATCH).loss
    loss.backward()
    grads = {n.replace(".default", ""): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), grads


def errors(model) -> list:
    return [f for f in inspect_model(model).findings if f.severity.value == "error"]


CLEAN = textwrap.dedent('''
    import sys, torch, transformers
    from peft import PeftModel
    base = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager")
    model = PeftModel.from_pretrained(base, sys.argv[2], is_trainable=True)
    model.train()
    batch = torch.arange(2 * 16).reshape(2, 16) % 120 + 3
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"loss": loss.item(), "grads": grads}, sys.argv[3])
''')


def clean_run(base_dir, adapter_dir, out) -> dict:
    """The same step in a process the patcher never touched. It runs from the output's folder: from the repository
    root, `-c` would put the root on sys.path, where our `kernels/` folder hides the `kernels` package that
    transformers 5.25 imports."""
    proc = subprocess.run([sys.executable, "-c", CLEAN, str(base_dir), str(adapter_dir), str(out)],
                          cwd=Path(out).parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


def assert_matches(got: tuple[float, dict], clean: dict) -> None:
    loss, grads = got
    assert loss == pytest.approx(clean["loss"], rel=1e-5)
    assert grads.keys() == clean["grads"].keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, clean["grads"][name], rtol=1e-4, atol=1e-6), name


@pytest.fixture(params=unsloth.VERSIONS)
def trained(request, tmp_path):
    """Train under the patcher and save the base and the adapter, as its users do; the patch stays on."""
    version = request.param
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    with unsloth.installed(version):
        base = tiny_llama()
        base.save_pretrained(base_dir)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                                task_type="CAUSAL_LM"))
        unsloth.attach(model, version)
        assert not errors(model)  # the patcher's own model runs; nothing it lacks is read unguarded
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(input_ids=BATCH, labels=BATCH).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.save_pretrained(adapter_dir)
        yield version, model, base_dir, adapter_dir


def plain_reload(base_dir, adapter_dir):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)


def test_plain_reload_is_predicted_and_repaired(trained, tmp_path):
    version, _, base_dir, adapter_dir = trained
    clean = clean_run(base_dir, adapter_dir, tmp_path / "clean.pt")
    model = plain_reload(base_dir, adapter_dir)
    found = errors(model)
    if version == "2025.11.1":
        (broken,) = found  # apply_qkv and apply_o, and nothing else, read bare
        assert broken.id == "ADC901" and "self.apply_o, self.apply_qkv on every path" in broken.message
        assert "2 LlamaAttention" in broken.message and "class patch by" in broken.message
        assert broken.message.endswith("object has no attribute 'apply_qkv'")  # the read that fails first
        with pytest.raises(AttributeError, match="'LlamaAttention' object has no attribute 'apply_qkv'"):
            model(input_ids=BATCH, labels=BATCH)
    else:
        assert not found  # gated: the library's forwards run on instances the patcher did not load
        assert "ADC902" in {f.id for f in inspect_model(model).findings}  # and says it falls back
        assert_matches(loss_and_grads(model), clean)

    report = ensure_patched(model)
    restored = {m.module_type for m in report.restored}
    assert {"PeftModelForCausalLM", "LlamaModel", "LlamaRotaryEmbedding"} <= restored, report.modules
    assert bool(report.repaired) == (version == "2025.11.1")
    assert not errors(model)
    assert_matches(loss_and_grads(model), clean)

    # adapters saved after the repair load in vanilla PEFT with identical logits
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=BATCH).logits
    save_adapter(model, tmp_path / "resaved")
    unpatch(model)
    assert isinstance(model.get_base_model().model.rotary_emb, unsloth.RotaryTable)  # as the patcher left it
    with unsloth.uninstalled():
        vanilla = plain_reload(base_dir, tmp_path / "resaved").eval()
        with torch.no_grad():
            assert torch.equal(vanilla(input_ids=BATCH).logits, ours)


def test_runtime_load_in_the_polluted_process_trains_as_a_clean_one(trained, tmp_path):
    _, _, base_dir, adapter_dir = trained
    clean = clean_run(base_dir, adapter_dir, tmp_path / "clean.pt")
    model, _ = load(adapter_dir, base=base_dir)
    assert not errors(model)
    assert_matches(loss_and_grads(model), clean)


def test_the_patchers_own_model_trains_the_same_after_ensure_patched(trained):
    _, model, _, _ = trained
    before = loss_and_grads(model)
    report = ensure_patched(model)
    assert report.changed and not report.failures
    loss, grads = loss_and_grads(model)
    assert loss == pytest.approx(before[0], rel=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, before[1][name], rtol=1e-4, atol=1e-6), name
    unpatch(model)


def test_a_model_patched_by_us_survives_plain_peft(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    ensure_patched(model)
    model(input_ids=BATCH, labels=BATCH).loss.backward()
    model.save_pretrained(tmp_path / "plain")  # plain PEFT save of a patched model
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=BATCH).logits
    fresh = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                      str(tmp_path / "plain")).eval()
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=BATCH).logits, expected, rtol=1e-5, atol=1e-6)
    # and plain PEFT loading onto a base we patched first
    patched_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ensure_patched(patched_base)
    on_patched = PeftModel.from_pretrained(patched_base, str(tmp_path / "plain")).eval()
    with torch.no_grad():
        assert torch.allclose(on_patched(input_ids=BATCH).logits, expected, rtol=1e-5, atol=1e-6)
