"""`doctor env` exits 0 with no problem, 1 when it reports one, 2 on a usage error; --help says so."""
from __future__ import annotations

import json

from adapter_doctor.cli import main
from click.testing import CliRunner


def run(*args: str):
    return CliRunner().invoke(main, ["env", *args], catch_exceptions=False)


def test_help_documents_the_exit_codes():
    text = run("--help").output
    assert "Exit codes:" in text
    lines = [line.strip() for line in text.splitlines()]
    assert any(line.startswith("0  no problem found") for line in lines)
    assert any(line.startswith("1  a known-bad combination") and "shadows a library" in line for line in lines)
    assert any(line.startswith("2  usage error") for line in lines)


def test_exit_code_follows_the_problems(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clean = run("--format", "json")
    assert clean.exit_code == (1 if json.loads(clean.output)["problems"] else 0)
    (tmp_path / "transformers.py").write_text("")  # a local module that shadows the library
    shadowed = run("--format", "json")
    assert shadowed.exit_code == 1
    assert any("transformers.py shadows the transformers library" in p for p in json.loads(shadowed.output)["problems"])
    assert run("--format", "rich").exit_code == 1


def test_usage_error_exits_two():
    assert run("--format", "xml").exit_code == 2
