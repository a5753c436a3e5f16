from adapter_doctor.checks import environment
from adapter_doctor.checks.environment import incompatible_pairs
from conftest import check, healthy


def test_transformers_5_needs_peft_0_18():
    assert incompatible_pairs({"transformers": "5.0.0", "peft": "0.17.1"})
    assert not incompatible_pairs({"transformers": "5.0.0", "peft": "0.18.0"})
    assert not incompatible_pairs({"transformers": "4.57.1", "peft": "0.17.1"})
    assert not incompatible_pairs({"transformers": None, "peft": "0.17.1"})


def test_pair_is_judged_on_the_target_versions():
    found = {f.id for f in check(healthy("llama-lora"), target_peft="0.17.1", target_transformers="5.2.0")}
    assert "ADC852" in found


def test_pickled_weights_with_old_torch(monkeypatch):
    monkeypatch.setattr(environment, "installed_version", lambda name: "2.5.1" if name == "torch" else None)
    assert "ADC851" in {f.id for f in check(healthy("llama-lora-bin"))}
    assert "ADC851" not in {f.id for f in check(healthy("llama-lora"))}
