"""Every healthy fixture and every real adapter that loads cleanly must produce no warning or error."""
import pytest
from conftest import FIXTURES, check

HEALTHY = sorted(p for p in (FIXTURES / "healthy").rglob("adapter_config.json"))


@pytest.mark.parametrize("config", HEALTHY, ids=lambda p: str(p.parent.relative_to(FIXTURES / "healthy")))
def test_healthy_fixture_has_no_problems(config):
    found = [f for f in check(config.parent) if f.severity.value != "info" and f.id != "ADC423"]
    assert found == []


@pytest.mark.parametrize("config", HEALTHY, ids=lambda p: str(p.parent.relative_to(FIXTURES / "healthy")))
def test_healthy_fixture_fits_its_base(config):
    # base_model_name_or_path is fixtures/bases/<arch>, relative to the repository root (the test's cwd).
    findings = check(config.parent)
    assert "ADC305" not in {f.id for f in findings}, "the base should resolve from the repository root"
    assert not [f for f in findings if f.category in ("shape-mismatch", "keys-unmatched", "base-model")
                and f.severity.value != "info"]


def test_the_bin_fixture_is_flagged_only_as_a_pickle():
    assert {f.id for f in check(FIXTURES / "healthy" / "llama-lora-bin") if f.severity.value != "info"} == {"ADC423"}
