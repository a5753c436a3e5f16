"""The architecture facts base_model.py derives from a config, shared by the checks and the fixers (no torch)."""
from __future__ import annotations

import json
import re

from adapter_doctor.base_model import arch_facts, expert_dims, expert_regex, layout_release
from adapter_doctor.transformers_renames import newest_release
from conftest import FIXTURES
from packaging.version import Version

MIXTRAL = json.loads((FIXTURES / "bases" / "mixtral" / "config.json").read_text())
QWEN = json.loads((FIXTURES / "bases" / "qwen3_moe" / "config.json").read_text())


def test_expert_dims_are_read_from_the_config_or_its_text_config():
    assert expert_dims(MIXTRAL) == (4, 32, 48)  # num_local_experts, hidden_size, intermediate_size
    assert expert_dims(QWEN) == (4, 32, 16)  # moe_intermediate_size before intermediate_size
    assert expert_dims({"model_type": "llava", "text_config": MIXTRAL}) == (4, 32, 48)


def test_expert_dims_are_none_without_every_size():
    assert expert_dims({k: v for k, v in MIXTRAL.items() if k != "num_local_experts"}) is None
    assert expert_dims({**MIXTRAL, "num_local_experts": True}) is None  # a bool is no count
    assert expert_dims({**MIXTRAL, "num_local_experts": 0}) is None


def test_the_per_expert_regex_takes_any_index_or_the_one_given():
    per_expert = arch_facts()["moe"]["layouts"]["mixtral"]["per_expert"]
    assert re.search(expert_regex(per_expert), "model.layers.0.block_sparse_moe.experts.12.w1.")
    assert not re.search(expert_regex(per_expert), "model.layers.0.block_sparse_moe.experts.w1.")
    assert not re.search(expert_regex(per_expert), "model.layers.0.block_sparse_moeXexperts.1.w1.")  # dots are dots
    found = re.search(expert_regex(per_expert, r"(\d+)") + "w1", "layers.0.block_sparse_moe.experts.7.w1")
    assert found is not None and found.group(1) == "7"


def test_the_layout_release_reads_a_dev_stamp_and_falls_back_to_the_newest():
    assert layout_release("5.9.0") == Version("5.9.0")
    assert layout_release("5.9.0.dev0@4f1c2ab") == Version("5.9.0.dev0")  # a source install's version
    assert layout_release("not a version") == layout_release(None) == Version(newest_release())
