"""Every `doctor fix` command that `doctor check` prints runs as printed: it plans a change for its finding.

The hints are read from the printed report (`doctor check -v`, info findings included) of every fixture and
every real adapter, and each is run as a dry run. A refusal of the hinted finding, for a missing option or any
other reason, means the hint suggested a command that does not work. The one placeholder a hint may hold is
NAME_OR_PATH (which base to record: only the user knows); it is replaced by a real base folder here.
"""
from __future__ import annotations

import json
import shlex

import pytest
from adapter_doctor.cli import main
from click.testing import CliRunner
from conftest import DATA, FIXTURES

PLACEHOLDER = "NAME_OR_PATH"
CORPUS = sorted([*(FIXTURES / "broken").iterdir(), *(FIXTURES / "healthy").iterdir(),
                 *(p for p in (DATA / "real-adapters").iterdir() if p.is_dir())])


def printed_hints(target) -> list[str]:
    result = CliRunner().invoke(main, ["check", "-v", str(target)], catch_exceptions=False)
    return [line.strip().removeprefix("fix: ") for line in result.output.splitlines()
            if line.strip().startswith("fix: doctor fix ")]


def all_hints() -> list[str]:
    return [hint for target in CORPUS for hint in printed_hints(target)]


HINTS = all_hints()


def test_the_corpus_prints_fix_commands_of_every_kind():
    kinds = {shlex.split(h)[shlex.split(h).index("--only") + 1] for h in HINTS}
    # the conversion, a config migration, a key rename, the opt-in cast and a base to record at least
    assert {"ADC423", "ADC203", "ADC501", "ADC704", "ADC301"} <= kinds, kinds
    assert any("--dtype bf16" in h for h in HINTS) and any(PLACEHOLDER in h for h in HINTS)


@pytest.mark.parametrize("hint", HINTS)
def test_a_printed_fix_command_plans_its_fix(hint):
    argv = shlex.split(hint.replace(PLACEHOLDER, str(FIXTURES / "bases" / "llama")))
    assert argv[:2] == ["doctor", "fix"]
    finding = argv[argv.index("--only") + 1]
    result = CliRunner().invoke(main, [*argv[1:], "--format", "json"], catch_exceptions=False)
    (fix,) = json.loads(result.output)["fixes"]
    refused = [r["reason"] for r in fix["refusals"] if r["finding"] == finding]
    assert not refused, f"{hint}: refused: {refused}"
    answered = {e["finding"] for e in fix["config_edits"]} | {c["finding"] for c in fix["tensor_changes"]}
    assert finding in answered and result.exit_code == 1  # a dry run with the change planned
