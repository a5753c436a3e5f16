"""The replay of transformers' checkpoint renamings (doctor/transformers_renames.py) on the committed table."""
from __future__ import annotations

import json
import re
import string

import pytest
from adapter_doctor.transformers_renames import (
    Scoped,
    _compiled,
    _rule_set,
    followed,
    rename_key,
    rename_module,
    table,
    transforms_for,
)
from packaging.version import Version

try:  # the parser behind re.compile
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_constants as _c
    import sre_parse as _sre


DEEPSEEK_V4 = transforms_for({"model_type": "deepseek_v4"}, Version("5.8.0"))
VIT = transforms_for({"architectures": ["ViTModel"]}, Version("5.24.0"))


def test_every_backreference_of_a_target_is_expanded():
    # deepseek_v4 (5.8 to 5.14): `^layers\.(\d+)\.self_attn\.(.*?)\.wq_a\.` -> `layers.\1.self_attn.\2.q_a_proj.`
    assert followed(DEEPSEEK_V4)
    renamed = rename_key("layers.3.self_attn.compressor.wq_a.weight", DEEPSEEK_V4)
    assert renamed.new == "layers.3.self_attn.compressor.q_a_proj.weight" and renamed.exact
    # after the earlier `attn.` -> `self_attn.` renaming of the same set
    assert rename_key("layers.12.attn.indexer.wkv.weight", DEEPSEEK_V4).new == \
        "layers.12.self_attn.compressor.indexer.kv_proj.weight"


def test_the_match_is_replaced_not_the_first_text_equal_to_it():
    # ViT's `attention.query(?!\w)` skips `attention.query_norm` and matches the second `attention.query`.
    renamed = rename_module("enc.attention.query_norm.attention.query", VIT)
    assert renamed.new == "enc.attention.query_norm.q_proj" and renamed.exact


def test_a_group_is_taken_from_the_branch_that_matched():
    rule = {"src": [r"^long\.(\d+)\.name", r"^s\.(\w+)\.t"], "dst": r"n.\1.m"}
    scopes = [Scoped("k", "5.0.0", (_compiled(rule),))]
    assert rename_key("s.abc.t.weight", scopes).new == "n.abc.m.weight"
    assert rename_key("long.7.name.weight", scopes).new == "n.7.m.weight"


@pytest.mark.parametrize("src", [[r"^p\.", r"^q\.(\d+)\."], [r"^q\.(\d+)\.", r"^p\."], [r"^a\.(\d+)\."]])
def test_a_branch_without_the_group_its_target_names_is_not_followed(src):
    # Without it transformers reads another branch's group (None) or raises IndexError: nothing can be said.
    transform = _compiled({"src": src, "dst": r"x.\1.y." if len(src) > 1 else r"x.\2.y."})
    assert transform.kind == "opaque"
    assert not followed([Scoped("k", "5.0.0", (transform,))])


def test_a_module_merged_by_a_converter_keeps_its_name_and_is_not_exact():
    renamed = rename_module("layers.0.ffn.experts.3.w1", DEEPSEEK_V4)
    assert (renamed.new, renamed.exact) == ("layers.0.ffn.experts.3.w1", False)


# --- every rule of the committed table, replayed on a key it matches -------------------------

_POOL = "a0_.x" + string.ascii_letters + string.digits + string.punctuation  # candidates for a class


def _class_char(items: list) -> str:
    negate = bool(items) and items[0][0] is _c.NEGATE

    def member(ch: str) -> bool:
        for op, av in items:
            if op is _c.LITERAL and chr(av) == ch or op is _c.RANGE and av[0] <= ord(ch) <= av[1]:
                return True
            if op is _c.CATEGORY and re.fullmatch({_c.CATEGORY_DIGIT: r"\d", _c.CATEGORY_WORD: r"\w",
                                                    _c.CATEGORY_SPACE: r"\s", _c.CATEGORY_NOT_DIGIT: r"\D",
                                                    _c.CATEGORY_NOT_WORD: r"\W"}.get(av, r"\S"), ch):
                return True
        return False

    return next(ch for ch in _POOL if member(ch) != negate)


def _text(items) -> str:
    """A string the parsed pattern matches: each repeat at least once, the first alternative of each branch."""
    out = []
    for op, av in items:
        if op is _c.LITERAL:
            out.append(chr(av))
        elif op is _c.NOT_LITERAL:
            out.append("a" if chr(av) != "a" else "b")
        elif op is _c.ANY:
            out.append("x")
        elif op is _c.IN:
            out.append(_class_char(list(av)))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            out.append(_text(av[2]) * max(av[0], min(1, av[1])))
        elif op is _c.SUBPATTERN:
            out.append(_text(av[-1]))
        elif op is _c.BRANCH:
            out.append(_text(av[1][0]))
        elif op in (_c.AT, _c.ASSERT_NOT):
            continue  # anchors and `(?!\w)`: a key that ends there meets them
        else:
            raise AssertionError(f"no text for {op} in the table's patterns")
    return "".join(out)


def _cases() -> list[tuple[str, int, str]]:
    """(rule set, rule, branch) for each distinct rule and branch: rule sets of successive releases share most."""
    seen: dict[tuple[str, str], tuple[str, int, str]] = {}
    for set_id, rules in table()["rule_sets"].items():
        for i, rule in enumerate(rules):
            for pattern in rule.get("src", []) + rule.get("convert", []):
                seen.setdefault((json.dumps(rule, sort_keys=True), pattern), (set_id, i, pattern))
    return list(seen.values())


def test_no_rule_of_the_table_raises_or_leaves_a_backreference():
    cases = _cases()
    assert len(cases) > 900  # the table is the one read from the wheels
    replayed = 0
    for set_id, i, pattern in cases:
        key = _text(_sre.parse(pattern))
        assert re.search(pattern, key), (pattern, key)
        transform = _rule_set(set_id)[i]
        if transform.kind == "opaque":
            continue
        renamed = rename_key(key, [Scoped(set_id, "5.0.0", (transform,))])  # raises on a bad group reference
        if transform.kind == "rename":
            assert renamed.new != key or transform.dst in key, (pattern, key, transform.dst)
            assert not re.search(r"\\\d", renamed.new), (pattern, key, renamed.new)
            replayed += 1
        else:
            assert not renamed.exact
    assert replayed > 800
