import json
import shutil

import pytest
from adapter_doctor.finding import Severity
from conftest import broken, check, healthy


def _by_id(findings):
    out = {}
    for f in findings:
        out.setdefault(f.id, []).append(f)
    return out


def test_newer_config_against_the_typeerror_era_names_the_first_unknown_key():
    found = _by_id(check(healthy("llama-lora"), target_peft="0.13.2"))
    (defaults,) = found["ADC201"]
    assert defaults.severity is Severity.ERROR
    assert "raises `TypeError: LoraConfig.__init__() got an unexpected keyword argument 'alora_invocation_tokens'`" in defaults.message


def test_newer_config_against_the_warning_era_is_harmless_when_defaults():
    found = _by_id(check(healthy("llama-lora"), target_peft="0.14.0"))
    assert found["ADC201"][0].severity is Severity.INFO
    assert "drops them with a UserWarning" in found["ADC201"][0].message
    assert "ADC202" not in found


def test_silently_ignoring_era():
    found = _by_id(check(healthy("llama-lora"), target_peft="0.3.0"))
    assert "ignores them silently" in found["ADC201"][0].message


@pytest.mark.parametrize("target, consequence", [("0.8.0", "raises `TypeError"), ("0.3.0", "ignores them silently")])
def test_non_default_new_feature_is_an_error_in_every_era(target, consequence):
    found = _by_id(check(healthy("mistral-dora-rslora"), target_peft=target))
    (dora,) = [f for f in found["ADC202"] if "use_dora" in f.message]
    assert dora.severity is Severity.ERROR and consequence in dora.message
    assert "needs PEFT >= 0.9.0" in dora.message and dora.title == "Uses DoRA, which PEFT %s does not have" % target
    assert dora.fix.fixer is None  # dropping it would change the adapter: refused


def test_qalora_unknown_to_older_release_in_the_warning_era():
    found = _by_id(check(broken("config-future-key-nondefault"), target_peft="0.15.2"))
    (qalora,) = found["ADC202"]
    assert "use_qalora=True" in qalora.message and "needs PEFT >= 0.16.0" in qalora.message
    assert "drops them with a UserWarning; the adapter then loads without it" in qalora.message
    assert "ADC202" not in _by_id(check(broken("config-future-key-nondefault"), target_peft="0.16.0"))


def test_legacy_keys():
    found = _by_id(check(broken("config-legacy-keys"), target_peft="0.10.0"))
    assert found["ADC203"][0].severity is Severity.ERROR and "last accepted by PEFT 0.2.0" in found["ADC203"][0].message
    assert _by_id(check(broken("config-legacy-keys")))["ADC203"][0].severity is Severity.INFO


def test_enable_lora_with_a_value_is_not_fixable_by_dropping(tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(broken("config-legacy-keys"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["enable_lora"] = [True, False, True]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (finding,) = _by_id(check(adapter))["ADC203"]
    assert "MergedLinear" in finding.message and finding.fix.fixer is None


def test_stamp_newer_than_target():
    found = _by_id(check(healthy("llama-lora"), target_peft="0.19.0"))
    assert "saved by PEFT 0.21.2" in found["ADC205"][0].message


def test_era_inferred_from_exact_key_set():
    (era,) = _by_id(check(broken("config-no-stamp-old-keyset")))["ADC206"]
    assert "exactly those PEFT 0.6" in era.message


def test_trimmed_config_says_no_era_can_be_inferred():
    (era,) = _by_id(check(broken("config-unsloth-trimmed")))["ADC206"]
    assert "trimmed" in era.message and "no release can be inferred" in era.message


@pytest.mark.parametrize("target, severity", [("0.14.0", Severity.ERROR), ("0.13.2", Severity.WARNING)])
def test_task_type_validated_only_from_0_14(target, severity):
    (finding,) = _by_id(check(broken("config-unknown-task-type"), target_peft=target))["ADC207"]
    assert finding.severity is severity


def test_target_note_says_where_the_version_came_from():
    (note,) = _by_id(check(healthy("llama-lora"), target_peft="0.13"))["ADC208"]
    assert "0.13 (from --target-peft, which behaves as 0.13.0)" in note.message


def test_future_stamp():
    (finding,) = _by_id(check(broken("config-stamp-future")))["ADC205"]
    assert "saved by PEFT 0.99.0" in finding.message


def test_unsloth_saved_adapters_are_named():
    (finding,) = _by_id(check(broken("config-unsloth-trimmed")))["ADC312"]
    assert finding.severity is Severity.INFO and "unsloth_fixed" in finding.message
    assert "ADC312" not in _by_id(check(healthy("llama-lora")))


def test_an_init_effect_the_table_names_and_the_check_does_not_word_is_still_reported(tmp_path, monkeypatch):
    from adapter_doctor.checks.config_version import UNKNOWN_EFFECT
    from adapter_doctor.knowledge import peft_table

    adapter = tmp_path / "a"
    shutil.copytree(healthy("llama-lora"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "lora_ga"}))
    (known,) = [f for f in _by_id(check(adapter, target_peft="0.18.1"))["ADC202"] if "init_lora_weights" in f.message]
    assert "raises `ValueError: Unknown initialization`" in known.message and "added; PEFT 0.18.1" in known.message
    # A regenerated table may name another effect: the finding words it generically instead of crashing (ADC000).
    monkeypatch.setitem(peft_table().resolve("0.18.1").lora_init_values, "other_strings", "warn")
    (other,) = [f for f in _by_id(check(adapter, target_peft="0.18.1"))["ADC202"] if "init_lora_weights" in f.message]
    assert f"PEFT 0.18.1 {UNKNOWN_EFFECT}." in other.message and "PEFT 0.19.0 added" in other.message
