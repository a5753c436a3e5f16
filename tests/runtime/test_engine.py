"""The engine's contract: instances only, all or nothing, idempotent, exactly reversible, marked, strict."""
import adapter_doctor
import pytest
import torch
from adapter_doctor.runtime import PatchError, engine, ensure_patched, unpatch


def module_states(model):
    """Everything unpatch must restore, per module: type, repr, instance attribute names."""
    return {path: (type(m), repr(m), sorted(vars(m))) for path, m in model.named_modules()}


def class_vars(model) -> dict:
    """vars() of every class in every module's MRO, by identity of each value."""
    classes = {klass for m in model.modules() for klass in type(m).__mro__}
    return {klass: {k: id(v) for k, v in vars(klass).items()} for klass in classes}


def test_no_class_is_ever_assigned_to(tiny, arch):
    model = tiny.lora(tiny.base(arch))
    before = class_vars(model)
    assert any(k.__module__.startswith("peft.") for k in before) and torch.nn.Module in before
    ensure_patched(model)
    model(input_ids=tiny.batch())
    assert {k: {n: id(v) for n, v in vars(k).items()} for k in before} == before
    unpatch(model)
    assert class_vars(model) == before
    fresh = tiny.base(arch)  # built after another model was patched: plain library classes
    assert all(type(m).__module__.split(".")[0] in ("transformers", "torch") for m in fresh.modules())
    assert not any(hasattr(m, "_adapter_doctor_patch") for m in fresh.modules())


def test_marker_in_repr_and_readable(tiny):
    model = tiny.lora(tiny.base())
    report = ensure_patched(model)
    attn = model.get_base_model().model.layers[0].self_attn
    marker = attn._adapter_doctor_patch
    assert (marker.version, marker.kernels) == (adapter_doctor.__version__, report.kernels)
    assert f"adapter_doctor={adapter_doctor.__version__}, kernels={report.kernels}" in repr(attn)
    assert type(attn).__name__ == "LlamaAttention" and type(attn).__mro__[1] is marker.original
    assert report.counts["LlamaAttention"] == {"patched": 2}


def test_idempotent(tiny):
    model = tiny.lora(tiny.base())
    first = ensure_patched(model)
    types_after_first = {p: type(m) for p, m in model.named_modules()}
    second = ensure_patched(model)
    assert first.changed == 12 and second.changed == 0
    assert len(second.already_patched) == 12
    assert {p: type(m) for p, m in model.named_modules()} == types_after_first


def test_unpatch_restores_exactly(tiny, arch):
    model = tiny.lora(tiny.base(arch))
    model(input_ids=tiny.batch())
    before = module_states(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    report = ensure_patched(model)
    assert report.changed and module_states(model) != before
    assert unpatch(model) == report.changed
    assert module_states(model) == before
    state = model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert unpatch(model) == 0


@pytest.mark.parametrize("k", [0, 5, 10])
@pytest.mark.parametrize("after_swap", [False, True])
def test_failure_mid_way_rolls_everything_back(tiny, monkeypatch, k, after_swap):
    model = tiny.lora(tiny.base())
    model.model.model.layers[1].mlp.forward = lambda x: x  # a foreign instance forward, removed while patched
    before = module_states(model)
    swap, calls = engine._swap, []

    def failing(step, kernels):
        calls.append(step.path)
        if after_swap:
            swap(step, kernels)  # the module is already changed when the failure comes
        if len(calls) == k + 1:
            raise RuntimeError("injected")
        if not after_swap:
            swap(step, kernels)

    monkeypatch.setattr(engine, "_swap", failing)
    with pytest.raises(RuntimeError, match="injected"):
        ensure_patched(model)
    assert module_states(model) == before
    assert not any(hasattr(m, "_adapter_doctor_patch") for m in model.modules())


def test_strict_raises_before_changing_anything(tiny):
    model = tiny.lora(tiny.base())
    del model.get_base_model().model.layers[1].self_attn.layer_idx
    before = module_states(model)
    with pytest.raises(PatchError, match="layer_idx") as raised:
        ensure_patched(model, strict=True)
    assert raised.value.report.skipped[0].path.endswith("layers.1.self_attn")
    assert module_states(model) == before
    report = ensure_patched(model)  # not strict: everything else is patched, the gap reported
    assert report.changed == 11 and len(report.skipped) == 1 and report.failures


def test_unsupported_model_type_is_left_alone(tiny):
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    before = module_states(model)
    report = ensure_patched(model)
    assert not report.supported and report.model_type == "gpt2" and report.changed == 0
    assert report.modules[0].action == "unsupported" and "gpt2" in report.modules[0].reason
    assert module_states(model) == before
    with pytest.raises(PatchError, match="gpt2"):
        ensure_patched(model, strict=True)


def test_model_type_is_found_through_peft_wrappers(tiny):
    from peft import PeftModel

    base = tiny.base("qwen3")
    assert engine.model_type_of(base) == "qwen3"
    model = tiny.lora(base)
    assert isinstance(model, PeftModel) and engine.model_type_of(model) == "qwen3"
    assert engine.model_type_of(torch.nn.Linear(2, 2)) is None


def test_accelerate_hooks_keep_wrapping_the_patched_forward(tiny):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    model = tiny.lora(tiny.base())
    layer = model.get_base_model().model.layers[0]
    add_hook_to_module(layer, Counting())
    ids = tiny.batch()
    expected = tiny.run(model, ids)
    before = module_states(model)
    ensure_patched(model)
    Counting.calls = 0
    got = tiny.run(model, ids)
    assert Counting.calls == 2 and torch.equal(got[0], expected[0])  # a training step, then logits
    assert layer._old_forward.__func__ is type(layer).forward
    unpatch(model)
    assert module_states(model) == before
    remove_hook_from_module(layer)


def test_patched_forwards_show_the_library_signature(tiny):
    # generation reads it to pass logits_to_keep, the Trainer to keep the dataset's columns
    import inspect

    model = tiny.lora(tiny.base())
    body = model.get_base_model()
    before = inspect.signature(body.forward)
    ensure_patched(model)
    assert type(body).forward is not type(body).__mro__[1].forward  # really ours now
    assert inspect.signature(body.forward) == before
    assert "logits_to_keep" in inspect.signature(body.forward).parameters
    attn = body.model.layers[0].self_attn
    assert list(inspect.signature(attn.forward).parameters)[:1] == ["hidden_states"]
