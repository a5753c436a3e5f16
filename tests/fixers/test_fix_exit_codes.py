"""`doctor fix` exits 1 when it writes nothing because every planned edit was refused: the findings remain."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from adapter_doctor.cli import main
from click.testing import CliRunner
from conftest import broken, healthy


def run(*args: str):
    return CliRunner().invoke(main, ["fix", *args], catch_exceptions=False)


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# Each refuses every edit it plans: a feature the target lacks, a cast without --dtype, a stamp no edit removes.
REFUSED = [("config-future-key-nondefault", ("--target-peft", "0.8.0")), ("values-fp32", ("--only", "ADC704")),
           ("config-stamp-future", ("--only", "ADC205"))]


@pytest.mark.parametrize("name, extra", REFUSED)
@pytest.mark.parametrize("fmt", ["rich", "json"])
def test_out_with_every_edit_refused_exits_one_and_writes_nothing(tmp_path, name, extra, fmt):
    out = tmp_path / "fixed"
    result = run(str(broken(name)), *extra, "--out", str(out), "--format", fmt)
    assert result.exit_code == 1, result.output
    assert not out.exists()
    if fmt == "json":
        (fix,) = json.loads(result.output)["fixes"]
        assert fix["refusals"] and not fix["changes_planned"]


@pytest.mark.parametrize("name, extra", REFUSED)
def test_inplace_with_every_edit_refused_exits_one_and_changes_nothing(tmp_path, name, extra):
    adapter = tmp_path / name
    shutil.copytree(broken(name), adapter)
    before = digest(adapter)
    result = run(str(adapter), *extra, "--inplace", "--yes")
    assert result.exit_code == 1 and "refused" in result.output
    assert digest(adapter) == before and not (adapter / ".doctor-backup").exists()


def test_a_written_fix_with_no_error_left_exits_zero(tmp_path):
    result = run(str(broken("keys-orig-mod")), "--out", str(tmp_path / "fixed"))
    assert result.exit_code == 0 and (tmp_path / "fixed" / "adapter_model.safetensors").exists()


def test_nothing_to_do_with_out_exits_zero(tmp_path):
    assert run(str(healthy("llama-lora")), "--out", str(tmp_path / "fixed")).exit_code == 0


def test_fix_help_documents_the_exit_codes():
    text = CliRunner().invoke(main, ["fix", "--help"]).output
    assert "Exit codes:" in text and "every edit was refused (--inplace, --out)" in text
