"""ADC518: target_modules and keys written with module names that transformers 5 renamed.

The fixture is a ViT LoRA saved by PEFT 0.17.1 on transformers 4.57.6 (`target_modules: ["query", "value"]`);
transformers 5.9 renamed ViT's modules (`vit.layers.N.attention.q_proj`), and PEFT renames neither the targets
nor, for ViT, the keys.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from adapter_doctor.safetensors_header import read_header
from adapter_doctor.transformers_renames import newest_release, rename_key, rename_module, transforms_for
from conftest import FIXTURES, broken, check, ids
from packaging.version import Version

VIT = broken("keys-vit-v4-names")
VIT_BASE = FIXTURES / "bases" / "vit-v4"
BASE_CONFIG = json.loads((VIT_BASE / "config.json").read_text())


NEWEST = {"target_transformers": newest_release()}  # judged as the newest release read builds ViT, whatever is installed


def _renamed_findings(**options):
    return [f for f in check(VIT, **{**NEWEST, **options}) if f.id == "ADC518"]


def test_renamed_vit_modules_are_an_error_with_an_exact_fix():
    (finding,) = _renamed_findings()
    assert finding.severity.value == "error"
    assert "vit.encoder.layer.0.attention.attention.query is now vit.layers.0.attention.q_proj" in finding.message
    assert "NoMatchingPeftModuleError" in finding.message and "transformers 5.9.0" in finding.message
    assert "['q_proj', 'v_proj']" in finding.fix.description
    # The same cause is not reported again as modules or targets missing from the base.
    assert not {"ADC513", "ADC514", "ADC515"} & ids(VIT, **NEWEST)


@pytest.mark.parametrize("release", ["4.57.6", "5.0.0", "5.8.1"])
def test_releases_before_the_rename_load_it(release):
    assert not [f for f in check(VIT, target_transformers=release)
                if f.category == "keys-unmatched" and f.severity.value != "info"]


def test_a_config_only_base_is_enough(tmp_path):
    shutil.copy(VIT_BASE / "config.json", tmp_path / "config.json")
    assert "ADC518" in ids(VIT, base=tmp_path, target_transformers="5.9.0")
    assert "ADC518" not in ids(VIT, base=tmp_path, target_transformers="5.8.1")


def test_the_table_renames_the_base_checkpoint_as_transformers_builds_it():
    transformers = pytest.importorskip("transformers", reason="needs transformers to build the model")
    version = Version(transformers.__version__)
    if version < Version("5.9"):
        pytest.skip(f"needs transformers >= 5.9, which renames ViT (installed: {version})")
    model = transformers.ViTForImageClassification.from_pretrained(VIT_BASE)
    scopes = transforms_for(BASE_CONFIG, version)
    on_disk = read_header(VIT_BASE / "model.safetensors").tensors
    assert any("attention.attention.query" in k for k in on_disk)
    assert {rename_key(k, scopes).new for k in on_disk} == set(model.state_dict())


def _apply_suggested_fix(adapter: Path, out: Path, description: str) -> Path:
    """The adapter with target_modules and keys renamed as the finding says: header rewritten, bytes copied."""
    out.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ast.literal_eval(re.search(r"target_modules to (\[.*?\])", description).group(1))
    (out / "adapter_config.json").write_text(json.dumps(config))
    scopes = transforms_for(BASE_CONFIG, Version(newest_release()))
    blob = (adapter / "adapter_model.safetensors").read_bytes()
    size = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + size])
    renamed = {}
    for key, entry in header.items():
        if key != "__metadata__":
            module, _, role = key.removeprefix("base_model.model.").partition(".lora_")
            key = f"base_model.model.{rename_module(module, scopes).new}.lora_{role}"
        renamed[key] = entry
    text = json.dumps(renamed).encode()
    text += b" " * (-len(text) % 8)
    (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + size:])
    return out


def test_real_peft_fails_as_predicted_and_the_suggested_fix_loads_bit_exact(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch for a real PEFT load")
    transformers = pytest.importorskip("transformers", reason="needs transformers for a real PEFT load")
    peft = pytest.importorskip("peft", reason="needs PEFT for a real load")
    if Version(transformers.__version__) < Version("5.9"):
        pytest.skip(f"needs transformers >= 5.9, which renames ViT (installed: {transformers.__version__})")
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from safetensors.torch import load_file

    (finding,) = _renamed_findings()
    base = transformers.ViTForImageClassification.from_pretrained(VIT_BASE)
    with pytest.raises(ValueError, match="Target modules .* not found in the base model") as raised:
        peft.PeftModel.from_pretrained(base, str(VIT))
    assert type(raised.value).__name__ == "NoMatchingPeftModuleError"

    fixed = _apply_suggested_fix(VIT, tmp_path / "fixed", finding.fix.description)
    assert not [f for f in check(fixed) if f.severity.value != "info"]
    model = peft.PeftModel.from_pretrained(transformers.ViTForImageClassification.from_pretrained(VIT_BASE), str(fixed))
    result = set_peft_model_state_dict(model, load_peft_weights(str(fixed)), adapter_name="default")
    assert [k for k in result.missing_keys if "lora" in k] == [] and list(result.unexpected_keys) == []
    params = dict(model.named_parameters())
    saved = load_file(str(fixed / "adapter_model.safetensors"))
    for key, tensor in saved.items():
        loaded = params[key.replace(".weight", ".default.weight")]
        assert torch.equal(loaded.detach().to(tensor.dtype), tensor), key
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        adapted = model(pixel_values=pixels).logits
        with model.disable_adapter():
            plain = model(pixel_values=pixels).logits
    assert not torch.equal(adapted, plain)  # the LoRA acts on the renamed modules


def test_the_suggested_fix_is_healthy_against_the_old_checkpoint(tmp_path):
    # The base's weights keep the 4.x names on disk; the doctor builds them as transformers 5.24 does, so the
    # renamed adapter matches them (no ADC514 for keys "not in the base"), and on 4.57 the old one still does.
    (finding,) = _renamed_findings()
    fixed = _apply_suggested_fix(VIT, tmp_path / "fixed", finding.fix.description)
    found = check(fixed, target_transformers="5.24.0")
    assert not [f for f in found if f.severity.value != "info" and f.category != "environment"]  # PEFT < 0.18 here
    assert json.loads((fixed / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]


def test_before_the_rename_real_peft_loads_the_old_names_bit_exact():
    torch = pytest.importorskip("torch", reason="needs torch for a real PEFT load")
    transformers = pytest.importorskip("transformers", reason="needs transformers for a real PEFT load")
    peft = pytest.importorskip("peft", reason="needs PEFT for a real load")
    if Version(transformers.__version__) >= Version("5.9"):
        pytest.skip(f"needs transformers < 5.9, which builds ViT with the old names (installed: {transformers.__version__})")
    from safetensors.torch import load_file

    assert not [f for f in check(VIT) if f.severity.value != "info"]  # judged against the installed release
    model = peft.PeftModel.from_pretrained(transformers.ViTForImageClassification.from_pretrained(VIT_BASE), str(VIT))
    params = dict(model.named_parameters())
    for key, tensor in load_file(str(VIT / "adapter_model.safetensors")).items():
        assert torch.equal(params[key.replace(".weight", ".default.weight")].detach().to(tensor.dtype), tensor), key


def _saved_after_the_rename(tmp_path: Path) -> Path:
    """The ViT adapter in transformers 5.9's names, as a later training run saves it."""
    (finding,) = _renamed_findings()
    return _apply_suggested_fix(VIT, tmp_path / "new-names", finding.fix.description)


@pytest.mark.parametrize("release", ["4.57.6", "5.0.0", "5.8.1"])
def test_an_adapter_saved_after_the_rename_is_an_error_on_an_older_release(tmp_path, release):
    adapter = _saved_after_the_rename(tmp_path)
    unmatched = [f for f in check(adapter, target_transformers=release)
                 if f.category == "keys-unmatched" and f.severity.value != "info"]
    assert [f.id for f in unmatched] == ["ADC520"]  # not ADC513/ADC514 again for the same cause
    (finding,) = unmatched
    assert f"vit.layers.0.attention.q_proj, which transformers {release} builds as " \
           "vit.encoder.layer.0.attention.attention.query" in finding.message
    assert "transformers >= 5.9.0" in finding.message and "Target modules ... not found" in finding.message
    assert finding.fix.description.startswith("Load with transformers >= 5.9.0, or set target_modules to "
                                              "['query', 'value']")


@pytest.mark.parametrize("release", ["5.9.0", "5.24.0"])
def test_an_adapter_saved_after_the_rename_is_healthy_from_it_on(tmp_path, release):
    assert not [f for f in check(_saved_after_the_rename(tmp_path), target_transformers=release)
                if f.category == "keys-unmatched" and f.severity.value != "info"]


def test_the_reverse_fix_gives_back_the_adapter_saved_before_the_rename(tmp_path):
    adapter = _saved_after_the_rename(tmp_path)
    (finding,) = [f for f in check(adapter, target_transformers="5.8.1") if f.id == "ADC520"]
    targets = ast.literal_eval(re.search(r"target_modules to (\[.*?\])", finding.fix.description).group(1))
    original = json.loads((VIT / "adapter_config.json").read_text())
    assert sorted(targets) == sorted(original["target_modules"])
    example = re.search(r"\((\S+) -> (\S+), …\)", finding.fix.description)
    assert any(k.startswith(f"base_model.model.{example.group(1)}.lora_")
               for k in read_header(adapter / "adapter_model.safetensors").tensors)
    assert any(k.startswith(f"base_model.model.{example.group(2)}.lora_")
               for k in read_header(VIT / "adapter_model.safetensors").tensors)


def test_real_peft_before_the_rename_cannot_load_the_new_names(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers for a real PEFT load")
    peft = pytest.importorskip("peft", reason="needs PEFT for a real load")
    if Version(transformers.__version__) >= Version("5.9"):
        pytest.skip(f"needs transformers < 5.9, which builds ViT with the old names (installed: "
                    f"{transformers.__version__}); the compat leg of .ci/run runs it")
    adapter = _saved_after_the_rename(tmp_path)
    assert "ADC520" in ids(adapter)  # judged against the installed release
    with pytest.raises(ValueError, match="Target modules .* not found in the base model"):
        peft.PeftModel.from_pretrained(transformers.ViTForImageClassification.from_pretrained(VIT_BASE), str(adapter))


REAL_ADAPTERS = {  # real adapters whose base class PEFT recorded (auto_mapping), rebuilt at the base's sizes
    "056-lockheed886__Vision-Transformers-for-Food-Classification__final_model": (
        "ViTForImageClassification", "ViTConfig", {"num_labels": 101}),  # google/vit-base-patch16-224's sizes
    "058-polarbeargo__Apply-Lightweight-Fine-Tuning-LLMs__segformer-scene-parse-150-lora": (
        "SegformerForSemanticSegmentation", "SegformerConfig",  # nvidia/mit-b0's sizes
        {"hidden_sizes": [32, 64, 160, 256], "num_attention_heads": [1, 2, 5, 8], "depths": [2, 2, 2, 2],
         "decoder_hidden_size": 256, "num_labels": 150}),
}


@pytest.mark.parametrize("name", sorted(REAL_ADAPTERS))
def test_real_adapters_with_old_names_load_as_the_verdict_says(name):
    transformers = pytest.importorskip("transformers", reason="needs transformers for a real PEFT load")
    peft = pytest.importorskip("peft", reason="needs PEFT for a real load")
    from conftest import DATA
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    adapter = DATA / "real-adapters" / name
    model_class, config_class, sizes = REAL_ADAPTERS[name]
    base = getattr(transformers, model_class)(getattr(transformers, config_class)(**sizes))
    renamed = "ADC518" in ids(adapter, target_transformers=transformers.__version__)
    assert renamed == (Version(transformers.__version__) >= Version("5.9"))
    if renamed:
        with pytest.raises(ValueError) as raised:
            peft.PeftModel.from_pretrained(base, str(adapter))
        assert type(raised.value).__name__ == "NoMatchingPeftModuleError"
    else:
        model = peft.PeftModel.from_pretrained(base, str(adapter))
        result = set_peft_model_state_dict(model, load_peft_weights(str(adapter)), adapter_name="default")
        assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys


def test_the_rename_verdict_is_judged_once_per_adapter(monkeypatch):
    # ADC518 and ADC514 (which leaves the renamed modules to it) read one verdict, cached on the context.
    from adapter_doctor import transformers_renames

    calls = []
    real = transformers_renames.verdict

    def counted(*args, **kwargs):
        calls.append(args[2])  # the adapter's modules
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers_renames, "verdict", counted)
    found = check(VIT, base=VIT_BASE, **NEWEST)
    assert "ADC518" in {f.id for f in found} and not {"ADC513", "ADC514", "ADC515"} & {f.id for f in found}
    assert len(calls) == 1 and calls[0]
    check(VIT, base=VIT_BASE, **NEWEST)
    assert len(calls) == 2  # and again for the next adapter


def _with_targets(tmp_path: Path, targets: object) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(VIT, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))
    return adapter


def test_a_pathological_target_regex_next_to_renamed_modules_is_not_run_nor_judged(tmp_path):
    import time

    # It selects vit.layers.N.attention.q_proj, but `(.*attention.*)*` backtracks exponentially on a miss.
    adapter = _with_targets(tmp_path, r"(.*attention.*)*\.q_proj")
    start = time.monotonic()
    found = check(adapter, base=VIT_BASE, **NEWEST)
    assert time.monotonic() - start < 30
    by_id = {f.id: f for f in found}
    assert "ADC109" in by_id  # the pattern is named as the reason the match is not run
    assert not {"ADC513", "ADC515"} & set(by_id)  # no "matches nothing" or "untrained" from a match not run
    assert "ADC518" not in by_id  # whether target_modules still selects the renamed modules cannot be said
    assert "ADC514" in by_id  # the old keys are not in the base, whatever the targets select


def test_list_targets_are_names_even_where_they_look_like_regexes(tmp_path):
    # PEFT matches list entries by name or `.`-suffix only, so the suggested list keeps such an entry as it is.
    adapter = _with_targets(tmp_path, ["query", "value", "(a|aa)*b"])
    (finding,) = [f for f in check(adapter, base=VIT_BASE, **NEWEST) if f.id == "ADC518"]
    assert "['(a|aa)*b', 'q_proj', 'v_proj']" in finding.fix.description
