from adapter_doctor.adapter_keys import ModuleSelector, ParameterSelector, dot_suffixes, module_selected, parse_key
from hypothesis import given, settings
from hypothesis import strategies as st

_parts = st.lists(st.sampled_from(["a", "b", "q_proj", "", "layers", "0"]), min_size=1, max_size=5)
_names = _parts.map(".".join)


@settings(max_examples=300, deadline=None)
@given(module=_names, targets=st.lists(_names, max_size=6))
def test_list_targets_match_as_peft_does(module, targets):
    # PEFT: `module == t or module.endswith("." + t)` for each entry; the selector uses set lookups.
    assert ModuleSelector(targets)(module) == any(module == t or module.endswith("." + t) for t in targets)


@settings(max_examples=300, deadline=None)
@given(module=_names, params=st.lists(_names.map(lambda n: n + ".weight"), max_size=4))
def test_target_parameters_match_by_their_owner(module, params):
    owners = {p.rsplit(".", 1)[0] for p in params}
    assert ParameterSelector(params)(module) == any(module == o or module.endswith("." + o) for o in owners)


def test_suffixes_of_a_name_with_a_million_parts_are_bounded():
    name = "a." * 1_000_000 + "q_proj"
    assert len(list(dot_suffixes(name))) == 64
    assert module_selected(name, ["q_proj"]) and not module_selected(name, ["b"])


def test_a_pattern_that_cannot_be_run_is_unknown_not_false():
    assert module_selected("a" * 40, "(a*)*b") is None
    assert module_selected("x.q_proj", "(unclosed") is None
    assert module_selected("x.q_proj", r".*\.q_proj") is True


def test_the_common_key_shape_parses_like_the_general_one():
    key = parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert (key.module, key.role, key.param, key.canonical, key.nested) == (
        "model.layers.0.self_attn.q_proj", "lora_A", "weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", False)
    nested = parse_key("base_model.model.m.base_layer.lora_B.weight")
    assert (nested.module, nested.nested) == ("m", True)
