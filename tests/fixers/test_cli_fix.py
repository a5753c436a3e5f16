import json
import shutil

import pytest
from adapter_doctor.cli import main
from adapter_doctor.fixers import FixOptions, apply, plan
from click.testing import CliRunner
from conftest import broken, healthy


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["fix", *args], input=input, catch_exceptions=False)


def test_dry_run_shows_the_plan_writes_nothing_and_exits_one(tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(broken("base-revision-unsloth"), adapter)
    before = (adapter / "adapter_config.json").read_bytes()
    result = run(str(adapter))
    assert result.exit_code == 1
    assert "ADC304 revision: 'unsloth' -> None" in result.output
    assert '-  "revision": "unsloth",' in result.output and '+  "revision": null,' in result.output  # the diff
    assert "dry run" in result.output
    assert (adapter / "adapter_config.json").read_bytes() == before


def test_nothing_to_do_exits_zero():
    result = run(str(healthy("llama-lora")))
    assert result.exit_code == 0 and "nothing to fix" in result.output


def test_inplace_asks_unless_yes(tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(broken("keys-module-prefix"), adapter)
    declined = run("--inplace", str(adapter))  # no terminal to ask on
    assert declined.exit_code == 2 and "--yes" in declined.output
    done = run("--inplace", "--yes", str(adapter))
    assert done.exit_code == 0, done.output
    assert "originals kept in" in done.output and "errors before: 1, after: 0" in done.output
    assert run(str(adapter)).exit_code == 0  # idempotent


def test_refusal_is_shown_with_its_reason_and_nothing_changes():
    result = run("--target-peft", "0.8.0", str(healthy("mistral-dora-rslora")))
    assert result.exit_code == 0
    assert "refused" in result.output and "use_dora=True needs PEFT >= 0.9.0" in result.output


def test_json_output(tmp_path):
    out = tmp_path / "fixed"
    result = run("--format", "json", "--out", str(out), str(broken("keys-orig-mod")))
    data = json.loads(result.output)
    (fix,) = data["fixes"]
    assert data["schema"] == 1 and fix["written"] == str(out) and fix["after"]["error"] == 0
    assert fix["tensor_changes"][0]["finding"] == "ADC501"


def test_bad_input_is_a_one_line_error(tmp_path):
    result = run(str(tmp_path / "missing"))
    assert result.exit_code == 2 and "no such file or folder" in result.output
    assert run("--inplace", "--out", str(tmp_path / "x"), str(healthy("llama-lora"))).exit_code == 2


FIXABLE = {
    "keys-orig-mod": {}, "keys-module-prefix": {}, "keys-fsdp-prefix": {}, "keys-adapter-name": {},
    "keys-no-base-model-prefix": {}, "config-no-peft-type": {}, "base-revision-unsloth": {},
    "config-legacy-keys": {"only": frozenset({"ADC203"})}, "keys-vlm-old-paths": {"target_peft": "0.15.2"},
    "values-fp32": {"only": frozenset({"ADC704"}), "dtype": "bf16"},
}


@pytest.mark.parametrize("name", sorted(FIXABLE))
def test_fixing_a_fixed_adapter_plans_nothing(tmp_path, name):
    options = FixOptions(**FIXABLE[name])
    adapter = tmp_path / name
    shutil.copytree(broken(name), adapter)
    apply(plan(adapter, options), inplace=True, options=options)
    assert plan(adapter, options).empty


def test_fixer_for_every_finding_that_names_one():
    """Each fixer id that a check names is implemented."""
    from adapter_doctor.checks import all_checks
    from adapter_doctor.fixers.planner import FIXERS

    named = {c.fixer for c in all_checks() if c.fixer}
    assert named <= {f.ID for f in FIXERS}
