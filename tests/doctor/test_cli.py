import json

import jsonschema
from adapter_doctor.cli import main
from click.testing import CliRunner
from conftest import DATA, ROOT

REAL = DATA / "real-adapters"
SCHEMA = json.loads((ROOT / "doctor" / "render" / "report.schema.json").read_text())
SARIF_SCHEMA = json.loads((DATA / "sarif-2.1.0-rtm.5.json").read_text())


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_healthy_real_adapter_exits_zero_and_says_so():
    result = run("check", str(REAL / "000-0112LY__logo-gemma-lora__adapter"))
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.output and "0 errors" in result.output


def test_errors_exit_one_and_show_mark_title_detail_and_fix():
    result = run("check", str(REAL / "079-requie__OptikalLLM__"))
    assert result.exit_code == 1
    assert "✗ ADC106 peft_type is missing" in result.output
    assert "fix: doctor fix" in result.output and "--only ADC106" in result.output
    assert "\x1b[" not in result.output  # no colour when not a terminal


def test_warnings_fail_only_with_strict():
    path = str(REAL / "009-Kimiko-AI__LoRa-traingcode__lora-alpaca")
    assert run("check", path).exit_code == 0
    assert run("check", "--strict", path).exit_code == 1


def test_missing_path_is_a_one_line_error_with_exit_two(tmp_path):
    result = run("check", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "no such file or folder" in result.output


def test_usage_errors_exit_two():
    assert run("check").exit_code == 2
    bad_version = run("check", "--target-peft", "banana", str(REAL))
    assert bad_version.exit_code == 2 and "not a version" in bad_version.output
    bad_id = run("check", "--select", "ADC999", str(REAL))
    assert bad_id.exit_code == 2 and "ADC999" in bad_id.output


def test_json_output_follows_the_published_schema():
    result = run("check", "--format", "json", *[str(p) for p in sorted(REAL.iterdir()) if p.is_dir()])
    data = json.loads(result.output)
    jsonschema.validate(data, SCHEMA)
    assert data["summary"]["exit_code"] == result.exit_code == 1
    assert data["summary"]["targets"] == len(data["targets"]) == 23


def test_sarif_output_is_valid_sarif_2_1_0():
    result = run("check", "--format", "sarif", str(REAL / "063-sherryxzhao__lora_alpaca__output"), str(REAL / "nope"))
    sarif = json.loads(result.output)
    jsonschema.validate(sarif, SARIF_SCHEMA)
    results = sarif["runs"][0]["results"]
    rules = sarif["runs"][0]["tool"]["driver"]["rules"]
    assert {r["ruleId"] for r in results} >= {"ADC412", "ADC301"}
    assert all(rules[r["ruleIndex"]]["id"] == r["ruleId"] for r in results)
    assert sarif["runs"][0]["invocations"][0]["executionSuccessful"] is False  # the missing path


def test_select_and_ignore_filter_by_id_or_category():
    path = str(REAL / "063-sherryxzhao__lora_alpaca__output")
    ids = lambda r: {f["id"] for t in json.loads(r.output)["targets"] for f in t["findings"]}  # noqa: E731
    assert ids(run("check", "--format", "json", "--select", "weights-corrupt", path)) == {"ADC412"}
    assert "ADC412" not in ids(run("check", "--format", "json", "--ignore", "ADC412,ADC208", path))


def test_verbose_shows_info_findings():
    path = str(REAL / "000-0112LY__logo-gemma-lora__adapter")
    assert "ADC208" not in run("check", path).output
    assert "ADC208" in run("check", "-v", path).output


def test_list_checks_and_explain():
    listing = json.loads(run("list-checks", "--format", "json").output)
    ids = [c["id"] for c in listing]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) > 40
    result = run("explain", "adc501")
    assert result.exit_code == 0 and "_orig_mod." in result.output and "doctor fix PATH --only ADC501" in result.output
    assert run("explain", "ADC999").exit_code == 2


def test_env_reports_versions_and_shadowing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "peft").mkdir()
    result = run("env", "--format", "json")
    info = json.loads(result.output)
    assert info["versions"]["adapter-doctor"]
    assert any("shadows the peft library" in p for p in info["problems"])
    assert result.exit_code == 1


def test_unreadable_config_is_exit_two_not_a_finding(tmp_path):
    adapter = tmp_path / "a"
    (adapter / "adapter_config.json").mkdir(parents=True)  # a folder where the file should be
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    result = run("check", str(adapter))
    assert result.exit_code == 2 and "adapter_config.json" in result.output
