import json
import shutil

import pytest
from adapter_doctor.finding import Severity
from conftest import FIXTURES, broken, check, healthy, ids


@pytest.mark.parametrize("fixture, expected", [
    ("base-abs-path-missing", "ADC301"), ("base-windows-path", "ADC302"), ("base-revision-unsloth", "ADC304"),
])
def test_base_reference_problems(fixture, expected):
    assert expected in ids(broken(fixture))


def test_quantized_base_name_is_info_alone_and_a_warning_against_a_full_precision_base():
    plain = {f.id: f for f in check(broken("base-bnb-4bit"))}
    assert plain["ADC303"].severity is Severity.INFO and "bitsandbytes" in plain["ADC303"].message
    against = {f.id: f for f in check(broken("base-bnb-4bit"), base=FIXTURES / "bases" / "llama")}
    assert against["ADC303"].severity is Severity.WARNING and "drift" in against["ADC303"].message


def test_hub_name_not_in_cache_is_info(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (finding,) = [f for f in check(broken("base-bnb-4bit")) if f.id == "ADC305"]
    assert finding.severity is Severity.INFO and "not in the local HF cache" in finding.message


def test_base_found_in_the_hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / "abc123"
    shutil.copytree(FIXTURES / "bases" / "llama", snapshot)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    adapter = tmp_path / "a"
    shutil.copytree(healthy("llama-lora"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "acme/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert not {f.id for f in check(adapter)} & {"ADC305", "ADC602"}
    shutil.rmtree(snapshot)
    shutil.copytree(FIXTURES / "bases" / "llama-wide", snapshot)  # same name, another model
    assert "ADC602" in ids(adapter)


def test_recorded_architecture_against_the_base(tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(healthy("llama-lora"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["auto_mapping"] = {"base_model_class": "Qwen2ForCausalLM", "parent_library": "transformers.models.qwen2"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (finding,) = [f for f in check(adapter) if f.id == "ADC306"]
    assert "Qwen2ForCausalLM" in finding.message and "LlamaForCausalLM" in finding.message


def test_wrong_architecture_shows_as_shapes_that_do_not_fit():
    assert {"ADC602", "ADC603"} <= ids(broken("base-wrong-arch"))


def test_empty_base_name(tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(healthy("llama-lora"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "ADC307" in {f.id for f in check(adapter)}


@pytest.mark.parametrize("fixture, expected", [("base-none", "ADC307"), ("base-arch-recorded", "ADC306")])
def test_recorded_base_problems(fixture, expected):
    assert expected in {f.id for f in check(broken(fixture))}


def test_unreadable_base_folder(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (finding,) = [f for f in check(healthy("llama-lora"), base=tmp_path) if f.id == "ADC308"]
    assert "config.json" in finding.message
