import json

import pytest
from conftest import DATA, broken, check, ids


@pytest.mark.parametrize("fixture, expected", [
    ("config-missing", "ADC101"),
    ("config-bad-json", "ADC102"),
    ("config-python-none", "ADC102"),
    ("config-empty", "ADC103"),
    ("config-lfs-pointer", "ADC104"),
    ("config-no-peft-type", "ADC106"),
    ("config-unknown-peft-type", "ADC107"),
    ("config-bad-types", "ADC108"),
    ("config-zero-rank", "ADC108"),
])
def test_each_defect_is_named(fixture, expected):
    assert expected in ids(broken(fixture))


def test_bad_json_reports_line_and_column():
    (finding,) = [f for f in check(broken("config-bad-json")) if f.id == "ADC102"]
    assert "line 5 column" in finding.message


def test_python_literal_is_named_as_such():
    (finding,) = [f for f in check(broken("config-python-none")) if f.id == "ADC102"]
    assert finding.title == "adapter_config.json uses Python literals" and "None" in finding.message


def test_wrong_types_name_the_field_and_the_declared_type():
    messages = [f.message for f in check(broken("config-bad-types")) if f.id == "ADC108"]
    assert any(m.startswith("r is '8' (string)") for m in messages)
    assert any("lora_dropout is -0.1" in m for m in messages)


def test_lenient_where_peft_is():
    # A whole float alpha and a null bool work in PEFT; they must not be reported.
    assert "ADC108" not in ids(DATA / "real-adapter-configs" / "030.json")
    assert "ADC108" not in ids(DATA / "real-adapter-configs" / "036.json")


@pytest.mark.parametrize("name, words", [
    ("135.json", "AdapterHub"), ("139.json", "MLX"), ("137.json", "no peft_type and none of PEFT's LoRA fields"),
])
def test_foreign_formats_are_named_for_what_they_are(name, words):
    (finding,) = [f for f in check(DATA / "real-adapter-configs" / name) if f.id == "ADC105"]
    assert words in finding.title + finding.message


def test_peft_type_none_suggests_lora():
    (finding,) = [f for f in check(DATA / "real-adapter-configs" / "025.json") if f.id == "ADC107"]
    assert "'none'" in finding.message and '"peft_type": "LORA"' in finding.message


def test_missing_peft_type_offers_the_fixer():
    (finding,) = [f for f in check(broken("config-no-peft-type")) if f.id == "ADC106"]
    assert finding.fix.fixer == "migrate-config"


def test_config_only_target_does_not_ask_for_weights(tmp_path):
    config = tmp_path / "copy.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    assert not ({"ADC101", "ADC401"} & ids(config))


@pytest.mark.parametrize("field, value, words", [
    ("target_modules", "(a*)*b", "exponential"),
    ("exclude_modules", ".*a.*a.*a.*a.*a.*b", "backtracking"),
    ("rank_pattern", {"q_proj": 4, "(x+x+)+y": 8}, "rank_pattern key '(x+x+)+y'"),
    ("alpha_pattern", {"(a|aa)*c": 8}, "alpha_pattern key"),
])
def test_pathological_regexes_are_named(tmp_path, field, value, words):
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], field: value}))
    (finding,) = [f for f in check(config) if f.id == "ADC109"]
    assert words in finding.message and finding.severity.value == "warning" and finding.path.endswith(field)


@pytest.mark.parametrize("value", [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj", "all-linear",
                                   r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$"])
def test_ordinary_regexes_are_not(tmp_path, value):
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": value,
                                  "rank_pattern": {"model.layers.0.self_attn.q_proj": 4, r"layers\.\d+\.mlp": 2}}))
    assert "ADC109" not in ids(config)
