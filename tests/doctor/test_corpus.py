"""The real-world corpus: 94 adapter_config.json files from public repositories.

`doctor check` runs on each without crashing, and its prediction of what each PEFT release does with the
file (loads, warns and drops keys, raises) matches what that real release did, as measured by
bench/peft_ground_truth.py in throwaway virtualenvs. The doctor derives its verdicts from the field table;
the measured table below is test data only.
"""
import json

import pytest
from adapter_doctor.artifact import parse_config_bytes
from adapter_doctor.knowledge import peft_table
from adapter_doctor.peft_load import predict
from conftest import DATA, check

CORPUS = sorted((DATA / "real-adapter-configs").glob("*.json"))
TRUTH = json.loads((DATA / "peft_ground_truth.json").read_text())
CASES = [(f, v) for f, by_version in sorted(TRUTH["results"].items()) for v in sorted(by_version)]


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_every_corpus_config_is_checked_without_crashing(path):
    check(path)
    check(path, target_peft="0.3.0")
    check(path, target_peft="0.13.2")


def test_ground_truth_covers_the_required_releases():
    measured = {v for by_version in TRUTH["results"].values() for v in by_version}
    for minor in ("0.3", "0.4", "0.5", "0.6", "0.8", "0.10", "0.13", "0.14", "0.17"):
        assert any(v.startswith(minor + ".") for v in measured), minor
    assert peft_table().newest.version in measured
    assert len(TRUTH["results"]) >= len(CORPUS)


@pytest.mark.parametrize("name, version", CASES, ids=[f"{n.rsplit('/', 1)[-1]}@{v}" for n, v in CASES])
def test_prediction_matches_the_real_release(name, version):
    raw = (DATA / name).read_bytes()
    config, problem = parse_config_bytes(raw)
    table = peft_table()
    assert table.is_known(version)
    measured = TRUTH["results"][name][version]
    # typed: the config PeftModel.from_pretrained builds; untyped: what PeftConfig.from_pretrained returns.
    for step, typed in (("typed", True), ("untyped", False)):
        actual = measured[step]
        if actual["status"] == "skipped":  # no peft_type: PeftModel.from_pretrained stops before building one
            continue
        prediction = predict(config, problem, table.resolve(version), typed=typed)
        assert prediction.outcome == actual["status"], (step, prediction, actual)
        if actual["status"] == "raises":
            assert prediction.error.split(":")[0] == actual["error"].split(":")[0], (step, prediction.error, actual["error"])
        else:
            assert sorted(prediction.dropped) == sorted(actual["dropped"]), (step, prediction, actual)


LOADED = [(n, v) for n, v in CASES if TRUTH["results"][n][v]["typed"]["status"] in ("loads", "warns")]


@pytest.mark.parametrize("name, version", LOADED, ids=[f"{n.rsplit('/', 1)[-1]}@{v}" for n, v in LOADED])
def test_no_config_value_error_where_the_real_release_loads(name, version):
    # e.g. `"revision": null` under PEFT 0.4-0.6, which declare `revision: str = None` and write that null
    bad = [f for f in check(DATA / name, target_peft=version, target_transformers="4.57.6")
           if f.category == "config-invalid" and f.severity.value == "error"]
    assert not bad, bad
