"""Nothing is lost when a fix fails: a full disk, read-only files, symlinks, a target that changes."""
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from adapter_doctor.fixers import FixOptions, FixWriteError, apply, plan
from adapter_doctor.fixers import execute as apply_module
from adapter_doctor.fixers import tensors as tensors_module
from adapter_doctor.fixers.atomic import leftover_staging
from conftest import broken


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def adapter(tmp_path) -> Path:
    """A compiled-model save whose fix touches both files: key renames and a config edit."""
    folder = tmp_path / "adapter"
    shutil.copytree(broken("keys-orig-mod"), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["revision"] = "unsloth"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_inplace_swaps_both_files_and_keeps_the_originals(adapter):
    before = digest(adapter)
    result = apply(plan(adapter), inplace=True)
    after = digest(adapter)
    backup = result.backup.relative_to(adapter)
    assert {k: v for k, v in after.items() if k.startswith(str(backup))} == {str(backup / k): v for k, v in before.items()}
    assert after["adapter_config.json"] != before["adapter_config.json"]
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert not leftover_staging(adapter)
    assert plan(adapter).empty  # idempotent


def test_out_leaves_the_original_untouched(adapter, tmp_path):
    before = digest(adapter)
    apply(plan(adapter), out=tmp_path / "copy")
    assert digest(adapter) == before and (tmp_path / "copy" / "adapter_model.safetensors").exists()
    with pytest.raises(FixWriteError, match="not empty"):
        apply(plan(adapter), out=tmp_path / "copy")


def test_full_disk_leaves_everything_as_it_was(adapter, monkeypatch):
    before = digest(adapter)

    def no_space(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensors_module, "_sync", no_space)
    with pytest.raises(FixWriteError, match="disk is full"):
        apply(plan(adapter), inplace=True)
    assert digest(adapter) == before and not leftover_staging(adapter)


def test_read_only_file_is_refused(adapter):
    before = digest(adapter)
    os.chmod(adapter / "adapter_model.safetensors", 0o444)
    with pytest.raises(FixWriteError, match="read-only"):
        apply(plan(adapter), inplace=True)
    assert digest(adapter) == before


def link_weights(adapter, tmp_path, name):
    """Move the weights to a blob store and leave a symlink in their place (as the HF cache does)."""
    store = tmp_path / "blobs"
    store.mkdir()
    (adapter / "adapter_model.safetensors").rename(store / name)
    (adapter / "adapter_model.safetensors").symlink_to(store / name)
    return store, (store / name).read_bytes()


def test_symlinked_weights_are_written_through(adapter, tmp_path):
    store, original = link_weights(adapter, tmp_path, "weights.safetensors")
    result = apply(plan(adapter), inplace=True)
    link = adapter / "adapter_model.safetensors"
    assert link.is_symlink() and link.resolve() == (store / "weights.safetensors").resolve()
    assert (store / "weights.safetensors").read_bytes() != original
    assert (result.backup / "adapter_model.safetensors").read_bytes() == original
    assert plan(adapter).empty


def test_symlinked_weights_become_a_real_file_only_with_out(adapter, tmp_path):
    store, original = link_weights(adapter, tmp_path, "w.safetensors")
    apply(plan(adapter), out=tmp_path / "copy")
    assert not (tmp_path / "copy" / "adapter_model.safetensors").is_symlink()
    assert (store / "w.safetensors").read_bytes() == original


def test_a_target_that_changes_during_the_fix_is_left_alone(adapter, monkeypatch):
    real = apply_module._verifier

    def meddling(plan_, options):
        check = real(plan_, options)

        def verify(folder):
            check(folder)
            # Someone saves a new config while the fix is being built.
            (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + " ")

        return verify

    monkeypatch.setattr(apply_module, "_verifier", meddling)
    p = plan(adapter)
    expected = digest(adapter)
    with pytest.raises(FixWriteError, match="changed while it was being fixed"):
        apply(p, inplace=True)
    expected["adapter_config.json"] = hashlib.sha256((adapter / "adapter_config.json").read_bytes()).hexdigest()
    assert digest(adapter) == expected and not leftover_staging(adapter)


def test_a_fix_that_would_not_help_is_not_written(adapter, monkeypatch):
    before = digest(adapter)
    p = plan(adapter)
    p.weights.renames = {}  # sabotage: the renames would be lost
    with pytest.raises(FixWriteError, match="would still show ADC501"):
        apply(p, inplace=True)
    assert digest(adapter) == before


def test_lone_config_file_is_replaced_alone(tmp_path):
    config = tmp_path / "copy.json"
    config.write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}))
    (tmp_path / "unrelated.txt").write_text("keep")
    p = plan(config)
    assert [e.key for e in p.edits] == ["peft_type"]
    result = apply(p, inplace=True, options=FixOptions())
    assert json.loads(config.read_text())["peft_type"] == "LORA"
    assert (tmp_path / "unrelated.txt").read_text() == "keep" and (result.backup / "copy.json").exists()
