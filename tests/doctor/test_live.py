"""inspect_model on live models: foreign patches, frozen adapters, dtypes, checkpointing, unsupported types."""
import pytest

torch = pytest.importorskip("torch", reason="live models need torch, transformers and PEFT (the [torch] extra)")
import transformers  # noqa: E402
from adapter_doctor import ensure_patched, inspect_model
from adapter_doctor.cli import main
from click.testing import CliRunner
from conftest import FIXTURES
from peft import LoraConfig, PeftModel, get_peft_model
from standins import unsloth


def tiny(model_type: str = "llama"):
    torch.manual_seed(0)
    if model_type == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    return transformers.LlamaForCausalLM(config)


def ids(report):
    return {f.id for f in report.findings}


def test_a_plain_model_has_nothing_to_report():
    assert ids(inspect_model(tiny())) == set()


def test_guarded_foreign_forward_is_a_warning_and_half_patched_models_are_named():
    model = tiny()
    layer = model.model.layers[0].self_attn

    def defensive(self, hidden_states, *args, **kwargs):
        qkv = getattr(self, "apply_qkv", unsloth.original_apply_qkv)
        return qkv(self, hidden_states)

    layer.forward = defensive.__get__(layer)  # an instance-level patch on one of two layers
    found = {f.id: f for f in inspect_model(model).findings}
    assert "ADC902" in found and "apply_qkv" in found["ADC902"].message
    assert "1 of 2 LlamaAttention" in found["ADC904"].message


def test_class_level_patch_missing_attributes_is_an_error():
    with unsloth.installed("2025.11.1"):
        model = tiny()
        (finding,) = [f for f in inspect_model(model).findings if f.id == "ADC901"]
        assert "apply_qkv" in finding.message and "standins.unsloth.attention_2025" in finding.message
        unsloth.attach(model, "2025.11.1")
        assert "ADC901" not in ids(inspect_model(model))
        assert "ADC903" in ids(inspect_model(model))  # patched, and complete


def test_a_wrapper_is_named_by_its_own_code_not_by_the_names_it_copied():
    import functools
    import types

    model = tiny()

    @functools.wraps(type(model).forward)
    def head(self, *args, **kwargs):  # what TRL's fused head does: call the forward it captured
        return captured(*args, **kwargs)

    captured = model.forward
    model.forward = types.MethodType(head, model)
    (finding,) = [f for f in inspect_model(model).findings if f.id == "ADC903"]
    assert "test_live.test_a_wrapper_is_named_by_its_own_code_not_by_the_names_it_copied.<locals>.head" in \
        finding.message and "(library by transformers)" in finding.message
    report = ensure_patched(model)
    assert [m.path for m in report.kept] == [""] and vars(model)["forward"].__func__ is head


def test_frozen_adapter_in_training_mode(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "a")
    frozen = PeftModel.from_pretrained(tiny(), str(tmp_path / "a"))  # is_trainable defaults to False
    frozen.train()
    assert "ADC906" in ids(inspect_model(frozen))
    trainable = PeftModel.from_pretrained(tiny(), str(tmp_path / "a"), is_trainable=True)
    trainable.train()
    assert "ADC906" not in ids(inspect_model(trainable))


def test_lora_dtype_against_the_base():
    model = get_peft_model(tiny().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    found = {f.id: f for f in inspect_model(model).findings}
    assert "float32" in found["ADC907"].message and "bfloat16" in found["ADC907"].message


def test_our_patch_is_reported_with_its_marker_and_reentrant_checkpointing_warned():
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ensure_patched(model)
    assert "ADC905" in ids(inspect_model(model)) and "ADC901" not in ids(inspect_model(model))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    assert "ADC908" in ids(inspect_model(model))


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_offloaded_checkpointing_replaced_by_torchs_is_a_warning(every_n_layers):
    # What the Trainer does at train() with gradient_checkpointing=True: gradient_checkpointing_enable puts
    # torch's checkpoint back on every layer, over the offloaded one.
    from adapter_doctor.runtime import enable_offloaded_checkpointing

    plain = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj"]))
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert "ADC912" not in ids(inspect_model(plain))  # torch's checkpoint, and nothing offloaded was asked for
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj"]))
    ensure_patched(model)
    assert enable_offloaded_checkpointing(model, every_n_layers=every_n_layers) == 2 // every_n_layers
    assert "ADC912" not in ids(inspect_model(model))  # the layers left unchecked are not replaced ones
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    found = [f for f in inspect_model(model).findings if f.id == "ADC912"]
    assert len(found) == 1 and found[0].severity.value == "warning"
    assert found[0].message.startswith("2 decoder layer(s), e.g. base_model.model.model.layers.0, run another")
    enable_offloaded_checkpointing(model)  # set up again: ours on every layer
    assert "ADC912" not in ids(inspect_model(model))


def test_unsupported_model_type_is_info():
    assert "ADC909" in ids(inspect_model(tiny("gpt2")))


def test_cli_model_and_adapter():
    result = CliRunner().invoke(main, ["check", "--format", "json", "--model", str(FIXTURES / "bases" / "llama"),
                                       "--adapter", str(FIXTURES / "healthy" / "llama-lora")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["check", "--model", str(FIXTURES / "bases" / "gpt2"), "-v"])
    assert "ADC909" in result.output


def test_building_a_saved_model_leaves_logging_and_warning_filters_as_they_were():
    import warnings

    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), list(warnings.filters))
    CliRunner().invoke(main, ["check", "--model", str(FIXTURES / "bases" / "llama")])
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), list(warnings.filters)) == before


def test_inspect_model_says_what_each_lora_projection_of_a_patched_model_runs():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = get_peft_model(transformers.LlamaForCausalLM(config), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    assert not [f for f in inspect_model(model).findings if f.id == "ADC911"]  # unpatched: PEFT's layers run
    ensure_patched(model)
    model.base_model.model.model.layers[1].mlp.down_proj.lora_dropout["default"] = torch.nn.Dropout(0.1)
    found = [f for f in inspect_model(model).findings if f.id == "ADC911"]
    assert [f.severity.value for f in found] == ["info", "warning"]
    assert found[0].message == "6 LoRA projections: 1 fallback; 5 fused"
    assert found[1].path == "base_model.model.model.layers.1.mlp.down_proj"
    assert "lora_dropout=0.1" in found[1].message
