"""False alarms and misses on adapters saved by real PEFT releases (tests/data/precision/make.py builds them).

Each verdict is read twice: from the files alone (no torch), and against what real PEFT 0.21.2 does when it
reloads the adapter. Logits are compared with those PEFT computed in memory when it built the adapter.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
from conftest import DATA, FIXTURES, check, ids, safetensors_bytes

PRECISION = DATA / "precision"
HAVE_PEFT = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("torch") is not None
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="needs torch, transformers and peft (the [torch] extra)")
NEOX_BASE = PRECISION / "bases" / "gpt-neox"

# adapter, options, the warnings and errors expected: each hand-checked against a reload below
VERDICTS = [
    ("distilbert-seq-cls", {}, set()),  # pre_classifier is wrapped by the "classifier" suffix
    # 0.2 matches by substring: also wrapped (ADC205: the file was saved by 0.21.2)
    ("distilbert-seq-cls", {"target_peft": "0.2.0", "target_transformers": "4.26.1"}, {"ADC205"}),
    ("llama-seq-cls", {}, set()),  # `score` is built by LlamaForSequenceClassification, not the saved class
    ("empty-weights", {}, {"ADC404"}),
    ("neox-merged-qkv-peft0.2", {"base": NEOX_BASE}, {"ADC203", "ADC423"}),  # no ADC604: the ranks agree
    ("qwen3moe-target-parameters-peft0.18", {}, {"ADC606"}),
    ("qwen3moe-target-parameters-peft0.18", {"target_peft": "0.18.1"}, set()),  # 0.18 reads what it wrote
    ("qwen3moe-target-parameters-peft0.19", {}, set()),
    ("llama-bone-peft0.18", {}, {"ADC209"}),
    ("llama-bone-peft0.18", {"target_peft": "0.18.1"}, set()),
    ("llama-bone-bat-peft0.18", {}, {"ADC209"}),
    ("mixtral-v4-rank-pattern", {"base": FIXTURES / "bases" / "mixtral"}, {"ADC605"}),
    ("mixtral-v4-rank-pattern", {"target_transformers": "4.57.6", "target_peft": "0.17.1"}, set()),
]


@pytest.mark.parametrize("name, options, expected", VERDICTS, ids=[f"{n}-{sorted(o)}" for n, o, _ in VERDICTS])
def test_verdict_from_the_files(name, options, expected):
    assert ids(PRECISION / name, **options) == expected


def _copy(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(PRECISION / name, out)
    return out


def _edit_config(adapter: Path, **values) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


def test_untargeted_weights_are_still_found(tmp_path):
    # Without the SEQ_CLS task and with another modules_to_save, nothing wraps pre_classifier/classifier.
    adapter = _copy("distilbert-seq-cls", tmp_path)
    _edit_config(adapter, task_type=None, modules_to_save=None)
    found = [f for f in check(adapter) if f.id == "ADC512"]
    assert found and "pre_classifier" in found[0].message


def test_a_head_the_task_does_not_build_is_reported(tmp_path):
    # A CAUSAL_LM adapter carrying `score`: AutoModelForCausalLM has no such module.
    adapter = _copy("llama-seq-cls", tmp_path)
    _edit_config(adapter, task_type="CAUSAL_LM")
    assert "ADC514" in ids(adapter)


def test_merged_qkv_with_disagreeing_ranks_is_still_inconsistent(tmp_path, write_safetensors):
    adapter = tmp_path / "merged"
    adapter.mkdir()
    shutil.copy(PRECISION / "neox-merged-qkv-peft0.2" / "adapter_config.json", adapter)
    module = "base_model.model.gpt_neox.layers.0.attention.query_key_value"
    tensors = {f"{module}.lora_A.weight": ("F32", [8, 32], bytes(8 * 32 * 4)),
               f"{module}.lora_B.weight": ("F32", [64, 3, 1], bytes(64 * 3 * 4))}  # groups=2 needs 4 per group
    (adapter / "adapter_model.safetensors").write_bytes(safetensors_bytes(tensors))
    assert "ADC604" in ids(adapter)


def test_revision_null_is_valid_where_the_default_is_none():
    # 015.json is a PEFT 0.4-0.6 config with "revision": null, which those releases write and load.
    for version in ("0.4.0", "0.5.0", "0.6.2"):
        assert "ADC108" not in {f.id for f in check(DATA / "real-adapter-configs" / "015.json", target_peft=version)}


def test_a_null_where_the_default_is_not_none_is_still_wrong(tmp_path):
    config = json.loads((FIXTURES / "healthy" / "llama-lora" / "adapter_config.json").read_text())
    config["r"] = None
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(config))
    assert "ADC108" in {f.id for f in check(path)}


def test_only_metadata_is_no_tensors_too(tmp_path):
    adapter = _copy("empty-weights", tmp_path)
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert ids(adapter) == {"ADC404"}


@pytest.mark.parametrize("stamp, severity", [("0.18.1", "error"), ("0.19.0.dev0@abc123", "warning"),
                                             ("0.19.0", None), ("0.19.0.dev0@UNKNOWN", "warning")])
def test_dev_build_stamps_parse(tmp_path, stamp, severity):
    adapter = _copy("qwen3moe-target-parameters-peft0.18", tmp_path)
    _edit_config(adapter, peft_version=stamp)
    found = {f.id: f.severity.value for f in check(adapter)}
    assert found.get("ADC606") == severity
    older = {f.id for f in check(adapter, target_peft="0.17.1")}
    assert "ADC205" in older  # the dev stamp still reads as newer than 0.17.1


def test_init_values_a_release_lacks_are_errors(tmp_path):
    adapter = _copy("empty-weights", tmp_path)
    shutil.copy(FIXTURES / "healthy" / "llama-lora" / "adapter_model.safetensors", adapter)
    _edit_config(adapter, init_lora_weights="lora_ga")
    old = {f.id: f for f in check(adapter, target_peft="0.17.1")}
    assert "ADC108" not in old and old["ADC202"].severity.value == "error"
    assert "Unknown initialization" in old["ADC202"].message
    assert "ADC202" not in {f.id for f in check(adapter, target_peft="0.19.0")}
    assert "meaning is lost" in {f.id: f for f in check(adapter, target_peft="0.6.2")}["ADC202"].message


def test_lost_pattern_entries_are_counted_as_they_are(tmp_path):
    adapter = _copy("mixtral-v4-rank-pattern", tmp_path)
    base = {"base": FIXTURES / "bases" / "mixtral"}
    (one,) = [f for f in check(adapter, **base) if f.id == "ADC605"]
    assert "rank_pattern 'w1' sets the per-expert module" in one.message and "more)" not in one.message
    _edit_config(adapter, rank_pattern={"w1": 8, "w3": 8, "q_proj": 4})  # q_proj is no expert: not lost
    (two,) = [f for f in check(adapter, **base) if f.id == "ADC605"]
    assert "rank_pattern 'w1' (and 1 more) sets the per-expert module" in two.message


# --- held against real PEFT -------------------------------------------------------------------------------


# The stored logits were computed on the saving machine. Another CPU's kernels sum in another order: up to 9e-8
# on an AVX2-only machine against files written where AVX-512 was used. The adapter switched off moves them by
# 0.1 or more, so any load that drops or misplaces tensors is still far outside.
SUMMATION_ORDER = 1e-6


def _logits(model, adapter: Path):
    """The largest difference from the logits stored beside `adapter` (0 on the machine that wrote them)."""
    import torch
    from safetensors.torch import load_file

    model.eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor([list(range(1, 17))])).logits.float()
    return (got - load_file(str(adapter) + ".logits.safetensors")["logits"]).abs().max().item()


def _load(model_class, base: Path, adapter: Path, **kwargs):
    import transformers
    from peft import PeftModel

    base_model = getattr(transformers, model_class).from_pretrained(str(base), **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base_model, str(adapter))
    return model, [str(w.message) for w in caught if "adapter keys" in str(w.message)]


@needs_peft
def test_reload_seq_cls_heads_bit_exact():
    model, warned = _load("DistilBertForSequenceClassification", PRECISION / "bases" / "distilbert",
                          PRECISION / "distilbert-seq-cls")
    assert not warned and _logits(model, PRECISION / "distilbert-seq-cls") < SUMMATION_ORDER
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}
    assert {"pre_classifier", "classifier"} <= wrapped
    model, warned = _load("LlamaForSequenceClassification", FIXTURES / "bases" / "llama", PRECISION / "llama-seq-cls",
                          num_labels=2)
    assert not warned and _logits(model, PRECISION / "llama-seq-cls") < SUMMATION_ORDER


@needs_peft
def test_reload_shows_the_broken_ones_are_broken(tmp_path):
    import transformers
    from peft import PeftModel

    with pytest.raises(RuntimeError, match="size mismatch"):  # ADC203: no later release reads MergedLinear
        _load("GPTNeoXForCausalLM", NEOX_BASE, PRECISION / "neox-merged-qkv-peft0.2")
    with pytest.raises(RuntimeError, match="size mismatch"):  # ADC606
        _load("Qwen3MoeForCausalLM", FIXTURES / "bases" / "qwen3_moe", PRECISION / "qwen3moe-target-parameters-peft0.18")
    with pytest.raises(KeyError, match="BONE"):  # ADC209
        _load("LlamaForCausalLM", FIXTURES / "bases" / "llama", PRECISION / "llama-bone-peft0.18")
    with pytest.raises(RuntimeError, match="size mismatch"):  # ADC605, under transformers 5
        _load("MixtralForCausalLM", FIXTURES / "bases" / "mixtral", PRECISION / "mixtral-v4-rank-pattern")
    model, warned = _load("Qwen3MoeForCausalLM", FIXTURES / "bases" / "qwen3_moe",
                          PRECISION / "qwen3moe-target-parameters-peft0.19")
    assert not warned and _logits(model, PRECISION / "qwen3moe-target-parameters-peft0.19") < SUMMATION_ORDER
    # ADC404: loads, warns about every key, and changes nothing
    base = transformers.LlamaForCausalLM.from_pretrained("fixtures/bases/llama")
    import torch

    ids_ = torch.tensor([list(range(1, 17))])
    with torch.no_grad():
        before = base(input_ids=ids_).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(PRECISION / "empty-weights"))
    assert any("missing adapter keys" in str(w.message) for w in caught)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids_).logits, before)
    # ADC512's broken variant: what no modules_to_save entry selects is dropped
    adapter = _copy("distilbert-seq-cls", tmp_path)
    _edit_config(adapter, task_type=None, modules_to_save=None)
    model, _ = _load("DistilBertForSequenceClassification", PRECISION / "bases" / "distilbert", adapter)
    assert not any(type(m).__name__ == "ModulesToSaveWrapper" and n.endswith("classifier")
                   for n, m in model.named_modules())


@needs_peft
def test_moe_swap_fix_reloads_bit_exact(tmp_path):
    from adapter_doctor.fixers import FixOptions, apply, plan

    out = tmp_path / "fixed"
    result = apply(plan(PRECISION / "qwen3moe-target-parameters-peft0.18", FixOptions(only=frozenset({"ADC606"}))), out=out)
    assert result is not None and ids(out) == set()
    shutil.copy(PRECISION / "qwen3moe-target-parameters-peft0.18.logits.safetensors", str(out) + ".logits.safetensors")
    model, warned = _load("Qwen3MoeForCausalLM", FIXTURES / "bases" / "qwen3_moe", out)
    assert not warned and _logits(model, out) < SUMMATION_ORDER


@needs_peft
@pytest.mark.parametrize("name", ["llama-bone-peft0.18", "llama-bone-bat-peft0.18"])
def test_bone_to_miss_fix_reloads_bit_exact(tmp_path, name):
    from adapter_doctor.fixers import FixOptions, apply, plan

    out = tmp_path / "fixed"
    apply(plan(PRECISION / name, FixOptions(only=frozenset({"ADC209"}))), out=out)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "MISS" and ids(out) == set()
    shutil.copy(PRECISION / f"{name}.logits.safetensors", str(out) + ".logits.safetensors")
    model, warned = _load("LlamaForCausalLM", FIXTURES / "bases" / "llama", out)
    assert not warned and _logits(model, out) < SUMMATION_ORDER


def test_bone_fix_refuses_what_it_has_not_verified(tmp_path):
    from adapter_doctor.fixers import FixOptions, plan

    adapter = _copy("llama-bone-peft0.18", tmp_path)
    _edit_config(adapter, bias="all")
    refused = plan(adapter, FixOptions(only=frozenset({"ADC209"}))).refusals
    assert [r.finding for r in refused] == ["ADC209"] and "bias" in refused[0].reason
