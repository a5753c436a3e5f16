import re
import time

import pytest
from adapter_doctor.user_regex import RANK_FORM, Matcher, pathological, pathological_keys, paths

CATASTROPHIC = ["(a*)*b", "(a+)+$", "(a|a)*x", "(a|aa)*b", "(x+x+)+y", "(\\w+)*$", "(.*a){20}", "((ab)*)*c",
                "(?:a?){40}a{40}", ".*a.*a.*a.*a.*a.*b"]
ORDINARY = ["q_proj", ".*\\.(q|v)_proj", "model\\.layers\\.\\d+\\.self_attn\\.(q|k|v)_proj",
            ".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",  # the example in PEFT's docs
            "^(?!.*vision).*(q_proj|k_proj)$", "(\\w+\\.)*q_proj", "[a-z_]+(\\.[a-z_0-9]+)*", "(?i)(\\w+\\.)*Q_PROJ",
            ".*(language_model).*\\.(q_proj|k_proj)", "a{1000}", "(\\d+\\.)+x"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_patterns_are_named(pattern):
    assert pathological(pattern)


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_patterns_are_not(pattern):
    assert pathological(pattern) is None
    if pattern.count("*") < 3:  # PEFT's rank form adds a `.*` of its own
        assert pathological(RANK_FORM.format(pattern), whole=False) is None


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_a_catastrophic_pattern_is_never_run_on_a_name_that_would_hang(pattern):
    matcher = Matcher()
    start = time.perf_counter()
    for name in ("a" * 40, "ab" * 30, "x" * 60 + "z", "aaaa.bbbb" * 8):
        assert matcher.fullmatch(pattern, name) is None or len(name) < 20
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_patterns_answer_as_re_does(pattern):
    matcher = Matcher()
    for name in ("model.layers.0.self_attn.q_proj", "model.vision.layers.1.k_proj", "decoder.block.0.SelfAttention.q",
                 "language_model.model.layers.3.self_attn.k_proj", "a" * 100, "1.2.3.x", "lm_head"):
        assert matcher.fullmatch(pattern, name) == (re.fullmatch(pattern, name) is not None), name
        rank = RANK_FORM.format(pattern)
        try:
            expected = re.match(rank, name) is not None
        except re.error:  # inline flags inside PEFT's group: PEFT raises, and so does the matcher
            with pytest.raises(re.error):
                matcher.match(rank, name)
            continue
        if pathological(rank, whole=False) is None:
            assert matcher.match(rank, name) == expected, name


def test_the_bound_grows_with_the_name_only_as_the_pattern_allows():
    assert paths("q_proj", 10_000) == 1
    assert paths(".*\\.(q|v)_proj", 1000) < 5000
    assert paths(".*a.*a.*b", 100) > 100**2


def test_one_budget_for_all_the_matches_of_an_adapter():
    matcher = Matcher(budget=100_000)
    answers = [matcher.fullmatch(".*x.*y", "x" * 50) for _ in range(200)]
    assert answers[0] is False and answers[-1] is None


def test_an_invalid_pattern_raises_as_it_does_in_peft():
    with pytest.raises(re.error):
        Matcher().fullmatch("(unclosed", "x")


def test_pathological_keys_are_those_peft_would_run_unbounded():
    keys = {"q_proj": 8, r"layers\.0\.(q|v)_proj": 4, "(a*)*b": 2, "(x+)+y": 2, 3: 1}
    bad = pathological_keys(keys)
    assert [k for k, _ in bad] == ["(a*)*b", "(x+)+y"]  # plain names and bounded regexes pass; a non-str is no key
    assert all("exponential" in why for _, why in bad)
    assert pathological_keys(keys, limit=2) == bad[:1]  # of the first 2 keys with regex syntax
    assert pathological_keys(None) == pathological_keys(["(a*)*b"]) == []
