import pytest
from adapter_doctor.finding import Severity
from conftest import FIXTURES, broken, check, ids


@pytest.mark.parametrize("fixture, expected, words", [
    ("keys-orig-mod", "ADC501", "'_orig_mod.'"),
    ("keys-module-prefix", "ADC501", "'module.'"),
    ("keys-fsdp-prefix", "ADC501", "'_fsdp_wrapped_module.'"),
    ("keys-no-base-model-prefix", "ADC503", "do not start with base_model.model."),
    ("keys-unpaired", "ADC511", "lora_A but no lora_B"),
    ("keys-untargeted", "ADC512", "k_proj, o_proj"),
])
def test_key_defects(fixture, expected, words):
    findings = [f for f in check(broken(fixture)) if f.id == expected]
    assert findings and words in findings[0].message, findings
    assert findings[0].severity is Severity.ERROR


def test_adapter_name_left_in_keys_depends_on_the_release():
    newest = [f for f in check(broken("keys-adapter-name")) if f.id == "ADC502"][0]
    old = [f for f in check(broken("keys-adapter-name"), target_peft="0.17.1") if f.id == "ADC502"][0]
    assert newest.severity is Severity.WARNING and old.severity is Severity.ERROR
    assert "matches none of them" in old.message


def test_old_vlm_paths_against_a_new_transformers():
    old_peft = [f for f in check(broken("keys-vlm-old-paths"), target_peft="0.15.2") if f.id == "ADC514"][0]
    assert old_peft.severity is Severity.ERROR and "model.language_model.layers.0" in old_peft.message
    new_peft = [f for f in check(broken("keys-vlm-old-paths")) if f.id == "ADC514"][0]
    assert new_peft.severity is Severity.INFO and "remaps these keys" in new_peft.message
    assert "ADC515" not in {f.id for f in check(broken("keys-vlm-old-paths"))}  # explained by the drift


def test_old_vlm_paths_are_fine_for_transformers_4():
    assert "ADC514" not in {f.id for f in check(broken("keys-vlm-old-paths"), target_transformers="4.51.3")}


def test_v4_moe_adapter_on_v5():
    converted = [f for f in check(broken("keys-v4-moe-on-v5")) if f.id == "ADC514"][0]
    assert converted.severity is Severity.INFO and "converts this family" in converted.message
    stuck = [f for f in check(broken("keys-v4-moe-on-v5"), target_peft="0.18.0") if f.id == "ADC514"][0]
    assert stuck.severity is Severity.ERROR and "block_sparse_moe.experts.0.w1" in stuck.message
    assert "ADC514" not in ids(broken("keys-v4-moe-on-v5"), target_transformers="4.57.6")


def test_v5_fused_moe_adapter_on_transformers_4():
    adapter = FIXTURES / "healthy" / "qwen3moe-v5-target-parameters"
    (finding,) = [f for f in check(adapter, target_transformers="4.57.6") if f.id == "ADC514"]
    assert "fused MoE experts" in finding.message and finding.severity is Severity.ERROR


def test_targets_that_match_nothing_in_the_base(tmp_path):
    import json
    import shutil

    adapter = tmp_path / "a"
    shutil.copytree(FIXTURES / "healthy" / "llama-lora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = r"model\.decoder\.layers\.\d+\.attn\.(q|v)"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "ADC513" in ids(adapter)


def test_fixture_targets_not_in_base_and_targeted_without_weights():
    assert "ADC513" in ids(broken("keys-targets-not-in-base"))
    (finding,) = [f for f in check(broken("keys-targeted-without-weights")) if f.id == "ADC515"]
    assert finding.severity is Severity.WARNING and "k_proj" in finding.message
