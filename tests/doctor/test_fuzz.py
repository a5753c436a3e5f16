"""Garbage in place of any file gives findings or a one-line error, never a traceback or an internal error."""
import json
import shutil
import struct

import pytest
from adapter_doctor.cli import main
from click.testing import CliRunner
from conftest import DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HEALTHY = DATA / "real-adapters" / "000-0112LY__logo-gemma-lora__adapter"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
config_keys = st.sampled_from(["peft_type", "r", "lora_alpha", "target_modules", "task_type", "rank_pattern",
                               "modules_to_save", "base_model_name_or_path", "use_dora", "layers_to_transform",
                               "exclude_modules", "target_parameters", "peft_version", "revision", "auto_mapping"])


def _check(adapter) -> dict:
    result = CliRunner().invoke(main, ["check", "--format", "json", str(adapter)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 1, 2)
    data = json.loads(result.output)
    ids = {f["id"] for t in data["targets"] for f in t["findings"]}
    assert "ADC000" not in ids, data
    return data


@pytest.fixture
def adapter(tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(HEALTHY, target)
    return target


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"])
@SETTINGS
@given(blob=st.binary(max_size=600))
def test_random_bytes_in_place_of_each_file(adapter, name, blob):
    (adapter / name).write_bytes(blob)
    data = _check(adapter)
    assert data["summary"]["exit_code"] in (1, 2)  # garbage is always reported


@SETTINGS
@given(config=st.dictionaries(config_keys, json_values, max_size=8))
def test_random_config_values(adapter, config):
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _check(adapter)


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=10), json_values, max_size=4), tail=st.binary(max_size=64))
def test_random_safetensors_headers(adapter, header, tail):
    raw = json.dumps(header).encode()
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + tail)
    _check(adapter)
