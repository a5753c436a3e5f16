import pytest
from adapter_doctor.finding import Severity
from conftest import broken, check, ids


@pytest.mark.parametrize("fixture, expected, words", [
    ("shape-rank-mismatch", "ADC601", "rank 4 in the file where the config gives 8"),
    ("shape-rank-pattern-mismatch", "ADC601", "rank 8 in the file where the config gives 4"),
    ("shape-base-mismatch", "ADC602", "out_features 32, base has 48"),
    ("shape-vocab-resized", "ADC603", "base vocab_size"),
    ("values-zero-size", "ADC701", "all"),
    ("values-nan", "ADC702", "NaN or Inf"),
    ("values-inf", "ADC702", "NaN or Inf"),
    ("values-all-zero-b", "ADC703", "all 14 lora_B tensors are exactly zero"),
    ("checkpoint-missing-optimizer", "ADC801", "optimizer.pt"),
])
def test_defects(fixture, expected, words):
    findings = [f for f in check(broken(fixture)) if f.id == expected]
    assert findings and words in findings[0].message, [f.message for f in check(broken(fixture))]


def test_fp32_is_only_info():
    (finding,) = [f for f in check(broken("values-fp32")) if f.id == "ADC704"]
    assert finding.severity is Severity.INFO and finding.fix.fixer == "cast-dtype"


def test_no_scan_skips_data_but_not_the_index():
    assert "ADC702" not in ids(broken("values-nan"), scan_values=False)
    assert "ADC701" in ids(broken("values-zero-size"), scan_values=False)


def test_complete_checkpoint_is_resumable():
    from conftest import healthy

    (finding,) = [f for f in check(healthy("checkpoint-llama")) if f.id == "ADC802"]
    assert "global step 2" in finding.message


def test_inner_rank_disagreement():
    (finding,) = [f for f in check(broken("shape-inner-rank")) if f.id == "ADC604"]
    assert "lora_A has 4 rows, lora_B has 2 columns" in finding.message


def test_unreadable_trainer_state():
    assert "ADC803" in ids(broken("checkpoint-bad-trainer-state"))
