"""ADC205 (saved by a newer PEFT): the hint is a command that works, and the refusal says which way round it is."""
from __future__ import annotations

import copy

from adapter_doctor.artifact import read_artifact
from adapter_doctor.checks import Context
from adapter_doctor.env import Env
from adapter_doctor.fixers import FixOptions, migrate_config, plan
from adapter_doctor.fixers.context import FixContext
from conftest import broken, check

STAMPED = broken("config-stamp-future")  # peft_version 0.99.0


def _adc205(**options):
    (finding,) = [f for f in check(STAMPED, **options) if f.id == "ADC205"]
    return finding


def test_a_target_that_reads_the_stamp_gets_no_fix_command_but_the_release_to_install():
    finding = _adc205(target_peft="0.21.2")
    assert finding.fix.fixer is None
    assert "PEFT >= 0.99.0" in finding.fix.description and "pip install -U 'peft>=0.99.0'" in finding.fix.description


def test_a_target_before_the_stamp_gets_the_fix_and_it_drops_the_stamp():
    finding = _adc205(target_peft="0.17.1")
    assert finding.fix.fixer == "migrate-config"
    p = plan(STAMPED, FixOptions(only=frozenset({"ADC205"}), target_peft="0.17.1"))
    assert [(e.key, e.finding) for e in p.edits] == [("peft_version", "ADC205")] and not p.refusals


def test_the_refusal_names_the_saving_release_as_the_newer_one():
    art = read_artifact(STAMPED, STAMPED / "adapter_config.json", None)
    ctx = Context(art, Env.detect("0.21.2", None))
    finding = _adc205(target_peft="0.21.2")
    part = migrate_config.plan(FixContext(art, ctx, [finding], FixOptions(target_peft="0.21.2"), copy.deepcopy(art.config)))
    (refusal,) = part.refusals
    assert "saved by PEFT 0.99.0, newer than the target 0.21.2" in refusal.reason
    assert "load it with PEFT >= 0.99.0" in refusal.reason and "knows the stamp" not in refusal.reason
    assert not part.edits
