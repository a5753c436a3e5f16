import pytest
from conftest import broken, check, ids


@pytest.mark.parametrize("fixture, expected", [
    ("weights-missing", "ADC401"),
    ("weights-lfs-pointer", "ADC402"),
    ("weights-truncated", "ADC411"),
    ("weights-trailing-bytes", "ADC411"),
    ("weights-header-bad-json", "ADC411"),
    ("weights-header-too-large", "ADC411"),
    ("weights-offsets-overlap", "ADC411"),
    ("weights-offsets-gap", "ADC411"),
    ("weights-bad-dtype", "ADC411"),
    ("weights-shape-span-mismatch", "ADC411"),
    ("weights-bin-and-safetensors-differ", "ADC413"),
    ("weights-pickle-malicious", "ADC421"),
    ("weights-pickle-malicious-zip", "ADC421"),
])
def test_each_defect_is_named(fixture, expected):
    assert expected in ids(broken(fixture))


@pytest.mark.parametrize("fixture, words", [
    ("weights-truncated", "shorter than its header says"),
    ("weights-trailing-bytes", "16 bytes after the last tensor"),
    ("weights-offsets-overlap", "overlaps"),
    ("weights-offsets-gap", "unindexed bytes"),
    ("weights-bad-dtype", "unknown dtype 'F17'"),
    ("weights-header-too-large", "200,000,000"),
])
def test_corruption_messages_name_the_defect(fixture, words):
    (finding,) = [f for f in check(broken(fixture)) if f.id == "ADC411"]
    assert words in finding.message


def test_lfs_pointer_names_the_real_size():
    (finding,) = [f for f in check(broken("weights-lfs-pointer")) if f.id == "ADC402"]
    assert "Git LFS pointer" in finding.message and "git lfs pull" in finding.fix.description


def test_malicious_pickle_names_the_global_and_is_never_loaded():
    (finding,) = [f for f in check(broken("weights-pickle-malicious")) if f.id == "ADC421"]
    assert "os.system" in finding.message or "posix.system" in finding.message


def test_differing_twins_name_a_tensor_and_identical_twins_are_only_redundant(tmp_path):
    (finding,) = [f for f in check(broken("weights-bin-and-safetensors-differ")) if f.id == "ADC413"]
    assert "hold different values" in finding.message
    assert "ADC413" not in ids(broken("weights-bin-and-safetensors-differ"), scan_values=False)
