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


def test_list_checks_as_a_table_names_every_check():
    ids = [c["id"] for c in json.loads(run("list-checks", "--format", "json").output)]
    table = run("list-checks").output
    assert table.split()[:5] == ["id", "category", "severity", "fixer", "title"]
    rows = [line.split()[0] for line in table.splitlines()[1:] if line.strip()]
    assert rows == ids


def test_explain_a_check_without_a_fixer_gives_its_manual_fix():
    from adapter_doctor.checks import all_checks

    check = next(c for c in all_checks() if not c.fixer and c.manual)
    result = run("explain", check.id)
    assert result.exit_code == 0
    assert result.output.rstrip().endswith(f"fix: {check.manual}") and "doctor fix PATH" not in result.output


def test_many_targets_at_a_terminal_get_a_progress_bar_and_the_same_report(tmp_path, monkeypatch):
    import shutil
    import sys

    from adapter_doctor import cli
    from adapter_doctor.diagnose import Options

    paths = []
    for i in range(21):  # over 20 targets: the bar shows at a terminal
        shutil.copytree(ROOT / "fixtures" / "healthy" / "llama-lora", tmp_path / f"a{i:02d}")
        paths.append(tmp_path / f"a{i:02d}")
    plain, _ = cli._run(tuple(paths), Options(), progress=True)  # not a terminal here: no bar
    shown, real = [], cli._progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(cli, "_progress", lambda total: shown.append(total) or real(total))
    barred, _ = cli._run(tuple(paths), Options(), progress=True)
    assert shown == [21]
    assert [t.path for t in barred.targets] == [t.path for t in plain.targets]
    assert [[f.id for f in t.findings] for t in barred.targets] == [[f.id for f in t.findings] for t in plain.targets]


def test_a_crash_is_one_line_with_exit_two_and_the_traceback_on_request(monkeypatch, capsys):
    import pytest
    from adapter_doctor import cli

    def crash(**_):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "main", crash)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")  # restored after; run() only sets it where unset
    monkeypatch.delenv("DOCTOR_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == "doctor: internal error: RuntimeError: boom (set DOCTOR_DEBUG=1 for details)\n"
    monkeypatch.setenv("DOCTOR_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.run()
    monkeypatch.setattr(cli, "main", lambda **_: (_ for _ in ()).throw(SystemExit(0)))  # exits pass through
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == 0


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
