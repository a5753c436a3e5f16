"""Tests of the transformers rename table generator and of the committed table.

The parser runs on small synthetic sources written here; nothing is downloaded. Where transformers is installed,
the parse of its own conversion_mapping.py is held against what transformers builds from it.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from conftest import load_tool
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
TABLE_PATH = ROOT / "doctor" / "knowledge" / "transformers_renames.json"


regen = load_tool("regenerate_transformers_renames")

MAPPING = '''
_MODEL_TO_CONVERSION_PATTERN = {"deit": "ViTModel", "mine": "vit_like"}

def _build_checkpoint_conversion_mapping():
    prefix = r"^backbone\\."
    shared = [WeightRenaming("attention.query", "q_proj")]
    mapping = {
        "ViTModel": [
            WeightRenaming(r"encoder\\.layer\\.", "layers."),
            *shared,
            WeightConverter(source_patterns="mlp.weights_in.weight", target_patterns=["a", "b"], operations=[Chunk(dim=0)]),
        ],
        "vit_like": [WeightRenaming(source_patterns=prefix + "x", target_patterns="model.x")],
        "prefixed": [PrefixChange(prefix_to_remove="model")],
    }
    mapping["extended"] = mapping["ViTModel"].copy() + [WeightRenaming(r"blocks\\.(\\d+)\\.", r"layer.\\1.")]
    mapping["extended"] += [WeightRenaming("^head", "^classifier")]
    mapping["built"] = [WeightRenaming(r.source_patterns[0], "y") for r in mapping["ViTModel"]]
    mapping["grown"] = mapping["vit_like"].copy()
    mapping["grown"].append(WeightRenaming(source_patterns="self_attn.q_proj", target_patterns="self_attn.q_gate_proj"))
    mapping["grown"].extend([WeightRenaming("^lm", "^head"), PrefixChange(prefix_to_remove="x")])
    mapping["grown"].append(make_one())
    if hasattr(torch, "anything"):
        mapping["ViTModel"] += [WeightRenaming("LayerNorm.gamma", "LayerNorm.weight")]
    for model_type, base_pattern in _MODEL_TO_CONVERSION_PATTERN.items():
        if model_type in mapping:
            continue
        mapping[model_type] = mapping[base_pattern].copy()
    return mapping
'''


def test_the_builder_is_replayed_on_rules():
    mapping = regen.parse_mapping(textwrap.dedent(MAPPING))
    vit = mapping["ViTModel"]
    assert vit[0] == {"src": [r"encoder\.layer\."], "dst": "layers."}
    assert vit[1] == {"src": [r"attention.query(?!\w)"], "dst": "q_proj"}  # a name boundary, as transformers adds
    assert vit[2] == {"convert": [r"mlp.weights_in.weight(?!\w)"]}
    assert vit[3]["dst"] == "LayerNorm.weight"  # the branch a current torch takes
    assert mapping["deit"] == vit and len(vit) == 4  # the alias loop, last, copies the finished list
    assert mapping["mine"] == mapping["vit_like"] == [{"src": [r"^backbone\.x(?!\w)"], "dst": "model.x"}]
    assert mapping["prefixed"] == [{"opaque": "PrefixChange"}]
    assert mapping["built"] == [{"opaque": "?"}]  # a comprehension: transforms that are there but not followed
    assert mapping["extended"][3] == {"src": [r"blocks\.(\d+)\."], "dst": r"layer.\1."}
    assert mapping["extended"][4] == {"src": [r"^head(?!\w)"], "dst": "classifier"}  # anchors drop from targets
    assert mapping["grown"] == [*mapping["vit_like"], {"src": [r"self_attn.q_proj(?!\w)"], "dst": "self_attn.q_gate_proj"},
                                {"src": [r"^lm(?!\w)"], "dst": "head"}, {"opaque": "PrefixChange"}, {"opaque": "make_one"}]


def test_capturing_targets_and_alternatives_compile_as_transformers_does():
    rule = regen.renaming([r"^c\.(\d+)", r"^a\.(\d+)\.b"], [r"x.(\d+).y"])
    assert rule["dst"] == r"x.\1.y"
    assert rule["src"] == [r"^a\.(\d+)\.b(?!\w)", r"^c\.(\d+)"]  # longest first: the alternation's branch order
    assert regen.renaming(["("], ["x"]) is None  # a pattern that does not compile says nothing


def test_a_branch_without_the_group_its_target_names_is_opaque():
    # transformers would read the next branch's group (None) or raise IndexError on a key that branch matches
    assert regen.renaming([r"^a\.(\d+)\.b", r"^c"], [r"x.(\d+).y"]) is None
    assert regen.renaming([r"^a\.(\d+)\.b"], [r"x.\1.\2.y"]) is None
    assert regen.renaming([r"^a\.(\d+)\.(\w+)\.b"], [r"x.\1.\2.y"]) == {"src": [r"^a\.(\d+)\.(\w+)\.b(?!\w)"],
                                                                          "dst": r"x.\1.\2.y"}
    mapping = regen.parse_mapping('def _build_checkpoint_conversion_mapping():\n'
                                  '    mapping = {"m": [WeightRenaming([r"^a\\.(\\d+)", r"^c"], r"x.(\\d+)")]}\n')
    assert mapping == {"m": [{"opaque": "WeightRenaming"}]}


def test_spans_record_when_a_key_appears_changes_and_goes():
    a, b = [{"src": ["a"], "dst": "b"}], [{"src": ["a"], "dst": "c"}]
    table = regen.build_table([("5.0.0", {"k": a}), ("5.1.0", {"k": a}), ("5.2.0", {"k": b}), ("5.3.0", {})], {})
    spans = table["keys"]["k"]
    assert [s[0] for s in spans] == ["5.0.0", "5.2.0", "5.3.0"]
    assert table["rule_sets"][spans[0][1]] == a and table["rule_sets"][spans[1][1]] == b and spans[2][1] is None


def test_submodels_are_read_from_init_assignments_with_the_inherited_prefix():
    modeling = {"transformers/models/vit/modeling_vit.py": textwrap.dedent('''
        class ViTPreTrainedModel(PreTrainedModel):
            base_model_prefix = "vit"
        class ViTModel(ViTPreTrainedModel):
            def __init__(self, config):
                self.encoder = ViTEncoder(config)
        class ViTForImageClassification(ViTPreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                self.vit = ViTModel(config, add_pooling_layer=False)
                self.classifier = nn.Linear(1, 2)
    ''')}
    subs = regen.parse_submodels(modeling, {"ViTModel"})
    assert subs == {"ViTForImageClassification": {"prefix": "vit", "children": [["vit", "ViTModel"]]}}


def test_wheels_are_one_per_minor_and_the_newest():
    def files(name):
        return [{"packagetype": "bdist_wheel", "url": f"/p/{name}.whl", "filename": f"{name}.whl",
                 "digests": {"sha256": "0"}}]
    index = {"releases": {v: files(v) for v in ["4.57.6", "5.0.0", "5.0.1", "5.1.0rc1", "5.1.0", "5.1.2"]}}
    assert [w.version for w in regen.list_wheels(index)] == ["5.0.0", "5.1.0", "5.1.2"]
    assert [w.version for w in regen.list_wheels(index, every=True)] == ["5.0.0", "5.0.1", "5.1.0", "5.1.2"]


# --- the committed table ------------------------------------------------------------------

TABLE = json.loads(TABLE_PATH.read_text())


def test_committed_table_is_consistent():
    releases = [Version(v) for v in TABLE["releases"]]
    assert releases == sorted(releases) and releases[0] >= Version("5.0")
    for key, spans in TABLE["keys"].items():
        assert [Version(s[0]) for s in spans] == sorted(Version(s[0]) for s in spans), key
        assert all(s[1] is None or s[1] in TABLE["rule_sets"] for s in spans), key
    for rules in TABLE["rule_sets"].values():
        for rule in rules:
            for pattern in rule.get("src", []) + rule.get("convert", []):
                re.compile(pattern)


def test_no_rule_of_the_committed_table_names_a_group_a_branch_lacks():
    for rules in TABLE["rule_sets"].values():
        for rule in rules:
            wanted = max((int(n) for n in re.findall(r"\\(\d+)", rule.get("dst", ""))), default=0)
            assert all(re.compile(p).groups >= wanted for p in rule.get("src", [])), rule


def test_committed_table_knows_the_vit_rename_from_5_9():
    # Read from the wheels: 5.8.1 has no ViTModel transforms, 5.9.0 renames query to q_proj.
    spans = TABLE["keys"]["ViTModel"]
    assert spans[0][0] == "5.9.0"
    assert {"src": [r"attention.query(?!\w)"], "dst": "q_proj"} in TABLE["rule_sets"][spans[0][1]]
    assert TABLE["submodels"]["ViTForImageClassification"] == {"prefix": "vit", "children": [["vit", "ViTModel"]]}


def test_the_parse_of_the_installed_release_equals_what_transformers_builds():
    conversion = pytest.importorskip("transformers.conversion_mapping", reason="needs transformers 5 installed")
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    source = Path(conversion.__file__).read_text(encoding="utf-8")
    mine = regen.parse_mapping(source)
    real = conversion._build_checkpoint_conversion_mapping()
    assert set(real) <= set(mine)
    compared = 0
    for key, transforms in real.items():
        if len(mine[key]) != len(transforms):  # only where a part is built in a way not followed, and marked so
            assert any("opaque" in rule for rule in mine[key]), key
            continue
        for ours, theirs in zip(mine[key], transforms):
            if type(theirs) is WeightRenaming and "src" in ours:  # subclasses (PrefixChange) are opaque here
                branches = re.findall(r"\(\?P<g\d+>(.*?)\)(?=\||$)", theirs.compiled_sources.pattern)
                assert (ours["src"], ours["dst"]) == (branches, theirs.target_patterns[0]), key
                compared += 1
            elif isinstance(theirs, WeightConverter):
                assert "convert" in ours or "opaque" in ours, key
    assert compared > 500
