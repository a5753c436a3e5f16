import pytest
from adapter_doctor.fixers import FixOptions, plan
from adapter_doctor.fixers.plan import ABSENT
from conftest import FIXTURES, broken, healthy


@pytest.mark.parametrize("fixture, finding", [
    ("keys-orig-mod", "ADC501"), ("keys-module-prefix", "ADC501"), ("keys-fsdp-prefix", "ADC501"),
    ("keys-adapter-name", "ADC502"), ("keys-no-base-model-prefix", "ADC503"),
])
def test_key_fixes_are_renames_to_canonical_names(fixture, finding):
    p = plan(broken(fixture))
    assert p.weights is not None and p.weights.streaming
    assert p.changes and {c.finding for c in p.changes} == {finding}
    assert all(c.after.startswith("base_model.model.model.layers.") and ".default" not in c.after for c in p.changes)
    assert not p.edits


def test_missing_peft_type_is_inferred_as_lora():
    p = plan(broken("config-no-peft-type"))
    (edit,) = p.edits
    assert (edit.key, edit.before, edit.after, edit.finding) == ("peft_type", ABSENT, "LORA", "ADC106")


def test_downgrade_drops_only_default_keys():
    p = plan(healthy("llama-lora"), FixOptions(target_peft="0.13.2"))
    dropped = {e.key for e in p.edits if e.after is ABSENT}
    assert {"peft_version", "target_parameters", "use_qalora", "trainable_token_indices"} <= dropped
    assert not dropped & {"r", "use_dora", "use_rslora", "lora_alpha"}  # all known to 0.13.2
    assert all(e.finding == "ADC201" for e in p.edits)
    assert "use_qalora" not in p.config_after and p.config_after["r"] == p.config_before["r"]


def test_downgrade_that_would_lose_dora_is_refused_whole():
    p = plan(healthy("mistral-dora-rslora"), FixOptions(target_peft="0.8.0"))
    assert p.empty
    assert any(r.finding == "ADC202" and "use_dora" in r.reason for r in p.refusals)


def test_legacy_keys_only_on_request_in_the_warning_era():
    assert plan(broken("config-legacy-keys")).empty  # harmless (info) for the installed PEFT
    p = plan(broken("config-legacy-keys"), FixOptions(only=frozenset({"ADC203"})))
    assert {e.key for e in p.edits} == {"enable_lora", "merge_weights"}


def test_revision_unsloth_and_set_base():
    assert [(e.key, e.after) for e in plan(broken("base-revision-unsloth")).edits] == [("revision", None)]
    p = plan(broken("base-abs-path-missing"))
    assert p.empty and any(r.finding == "ADC301" and "--set-base" in r.reason for r in p.refusals)
    p = plan(broken("base-abs-path-missing"), FixOptions(set_base="fixtures/bases/llama"))
    assert [(e.key, e.after) for e in p.edits] == [("base_model_name_or_path", "fixtures/bases/llama")]


def test_pickle_conversion_is_planned_only_for_a_clean_scan():
    p = plan(healthy("llama-lora-bin"))
    assert p.weights.from_pickle and p.remove == {"adapter_model.bin"}
    refused = plan(broken("weights-pickle-malicious"), FixOptions(only=frozenset({"weights-unsafe"})))
    assert refused.empty


def test_cast_needs_dtype():
    p = plan(broken("values-fp32"), FixOptions(only=frozenset({"ADC704"})))
    assert p.empty and "--dtype" in p.refusals[0].reason
    p = plan(broken("values-fp32"), FixOptions(only=frozenset({"ADC704"}), dtype="bf16"))
    assert p.weights.cast == "BF16" and not p.weights.streaming


def test_vlm_paths_are_renamed_for_the_target_transformers():
    p = plan(broken("keys-vlm-old-paths"), FixOptions(target_peft="0.15.2"))
    assert p.changes and all(c.after.startswith("base_model.model.model.language_model.") for c in p.changes)
    back = plan(FIXTURES / "healthy" / "v4" / "llava-lora", FixOptions(target_transformers="4.51.3"))
    assert back.changes and all(c.after.startswith("base_model.model.language_model.model.") for c in back.changes)


def test_unfixable_problems_are_listed_with_what_to_do():
    p = plan(broken("values-nan"))
    assert p.empty and p.refusals[0].finding == "ADC702" and "fix by hand" in p.refusals[0].reason


def test_a_folder_of_several_adapters_is_refused():
    from adapter_doctor.targets import TargetError

    with pytest.raises(TargetError, match="holds 2 adapters"):
        plan(healthy("llama-multi"))
