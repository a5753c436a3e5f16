"""Fixers that rewrite tensors, combined with each other and with renames, on adapters saved by real PEFT.

tests/data/precision/ holds the real-PEFT adapters; tests/doctor/checks/test_precision.py reloads their
fixes through PEFT and compares logits, so a fix equal to one checked there is checked too.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from adapter_doctor.fixers import FixOptions, apply, plan, planner
from adapter_doctor.fixers.plan import FixerPlan, TensorChange
from adapter_doctor.fixers.tensors import read_tensors, write_tensors
from click.testing import CliRunner
from conftest import DATA, broken, ids
from hostile import View, torch_zip

PRECISION = DATA / "precision"
QWEN_018 = PRECISION / "qwen3moe-target-parameters-peft0.18"  # ADC606: lora_A/lora_B on the sides 0.18 used
SWAP = FixOptions(only=frozenset({"ADC606"}))


def _copy(source: Path, tmp_path: Path, name: str = "adapter") -> Path:
    out = tmp_path / name
    shutil.copytree(source, out)
    return out


def _rewrite(adapter: Path, rename=lambda n: n, metadata: dict[str, str] | None = None) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors, old = read_tensors(path)
    write_tensors(path, {rename(n): t for n, t in tensors.items()}, metadata or old)


def test_a_bone_adapter_saved_as_a_pickle_is_refused_in_one_line(tmp_path):
    from adapter_doctor.cli import main

    adapter = _copy(PRECISION / "llama-bone-peft0.18", tmp_path)
    tensors, _ = read_tensors(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    views = {n: View(t.shape, key=str(i)) for i, (n, t) in enumerate(tensors.items())}
    torch_zip(adapter / "adapter_model.bin", views, {str(i): t.data for i, t in enumerate(tensors.values())})
    config = (adapter / "adapter_config.json").read_bytes()
    out = tmp_path / "fixed"
    result = CliRunner().invoke(main, ["fix", str(adapter), "--only", "ADC209", "--out", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "internal error" not in result.output.lower() and "HeaderError" not in result.output
    refusals = [line for line in result.output.splitlines() if "convert the pickle to safetensors first" in line]
    assert len(refusals) == 1 and "ADC209" in refusals[0] and "--only ADC423" in refusals[0], result.output
    assert not out.exists() and (adapter / "adapter_config.json").read_bytes() == config


def test_prefixed_keys_and_the_moe_swap_are_fixed_in_one_run(tmp_path):
    prefixed = _copy(QWEN_018, tmp_path, "prefixed")
    _rewrite(prefixed, lambda n: "module." + n)  # what a DDP-wrapped save leaves (ADC501)
    p = plan(prefixed)
    assert {"ADC501", "ADC606"} <= p.answered
    apply(p, out=tmp_path / "fixed")
    assert ids(tmp_path / "fixed") == set()
    # The same files as the fix of the unprefixed adapter, which test_precision reloads bit-exact through PEFT.
    apply(plan(QWEN_018, SWAP), out=tmp_path / "reference", options=SWAP)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "fixed" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def _provenance(adapter: Path, options: FixOptions) -> dict[str, str]:
    """The __metadata__ adapter-doctor's runtime writes, for the base this adapter is checked against."""
    from adapter_doctor.diagnose import Options, examine
    from adapter_doctor.env import Env
    from adapter_doctor.provenance import Provenance, base_fields, fingerprint
    from adapter_doctor.targets import discover

    ctx = examine(discover(adapter)[0], Options(base=options.base), Env.detect())
    base = ctx.base
    assert base is not None
    modules = {k.module for k in ctx.artifact.keys.values() if k.role.startswith("lora_")}
    dims = {m: (base.modules[m].in_features, base.modules[m].out_features) for m in modules
            if m in base.modules and base.modules[m].kind != "experts"}
    saved = Provenance("0.1.0", {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"},
                       {"kernels": "triton", "patched": 4}, None, fingerprint(base.config, dims), base_fields(base.config))
    return {"format": "pt", **saved.to_metadata()}


@pytest.mark.parametrize("source, finding", [(QWEN_018, "ADC606"), (broken("keys-v4-moe-on-v5"), "ADC514")],
                         ids=["moe-swap", "migrate-layout"])
def test_provenance_survives_a_fixer_that_rewrites_the_tensors(tmp_path, source, finding):
    adapter = _copy(source, tmp_path)
    options = FixOptions(only=frozenset({finding}))
    stamped = _provenance(adapter, options)
    _rewrite(adapter, metadata=stamped)
    p = plan(adapter, options)
    assert p.weights is not None and p.weights.tensors is not None and finding in p.answered
    apply(p, out=tmp_path / "fixed", options=options)
    _, metadata = read_tensors(tmp_path / "fixed" / "adapter_model.safetensors")
    assert metadata == stamped


def test_a_second_fixer_rewriting_the_tensors_is_refused_not_lost(tmp_path, monkeypatch):
    from adapter_doctor.fixers import moe_swap

    alone = plan(QWEN_018, SWAP)
    second = SimpleNamespace(ID=moe_swap.ID, plan=lambda ctx: FixerPlan(
        tensors={}, changes=[TensorChange("all tensors", "none", "stand-in rewrite", "ADC606")]))
    monkeypatch.setattr(planner, "FIXERS", (moe_swap, second))
    both = plan(QWEN_018, SWAP)
    assert both.weights is not None and both.weights.tensors == alone.weights.tensors  # the first one's, kept
    assert [c.what for c in both.changes] == [c.what for c in alone.changes]  # nothing claimed for the second
    (refusal,) = both.refusals
    assert refusal.finding == "ADC606" and "moe-swap rewrites the tensors in this run too" in refusal.reason


def test_the_moe_swap_shares_the_adapters_regex_budget(tmp_path, monkeypatch):
    adapter = _copy(QWEN_018, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 4}  # read through the shared budget for every expert module
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert plan(adapter, SWAP).weights is not None
    checked = planner.findings_of

    def then_spent(check):
        found = list(checked(check))
        check.matcher.left = 0  # the checks used it all up: the fixer may run no more user regexes
        return found

    monkeypatch.setattr(planner, "findings_of", then_spent)
    p = plan(adapter, SWAP)
    assert p.weights is None and [r.finding for r in p.refusals] == ["ADC606"]
