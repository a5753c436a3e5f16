"""Per-projection fallbacks: LoRA layers the fused kernel cannot run are called as PEFT runs them, and reported."""
import pytest
import torch
from adapter_doctor.runtime import ensure_patched


def seeded_run(tiny, model, ids):
    torch.manual_seed(123)  # dropout draws the same masks in the same order on both paths
    return tiny.run(model, ids)


@pytest.mark.parametrize("config,reason", [
    ({"lora_dropout": 0.1}, "lora_dropout=0.1"),
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_ineligible_projections_fall_back_with_equal_numerics(tiny, config, reason):
    model = tiny.lora(tiny.base(), **config)
    ids = tiny.batch()
    expected = seeded_run(tiny, model, ids)
    report = ensure_patched(model)
    assert report.changed == 12 and not report.failures
    assert len(report.fallbacks) == 7 * 2 and {f.reason for f in report.fallbacks} == {reason}
    assert any(f.path.endswith("layers.0.self_attn.q_proj") for f in report.fallbacks)
    got = seeded_run(tiny, model, ids)
    assert tiny.rel(got[0], expected[0]) <= 1e-5 and tiny.rel(got[1], expected[1]) <= 1e-5
    assert max(tiny.rel(got[2][n], expected[2][n]) for n in expected[2]) <= 1e-4


def test_only_the_targeted_projections_are_lora(tiny):
    model = tiny.lora(tiny.base(), target_modules=["q_proj", "v_proj"])
    ids = tiny.batch()
    expected = tiny.run(model, ids)
    report = ensure_patched(model)
    assert not report.fallbacks
    got = tiny.run(model, ids)
    assert tiny.rel(got[0], expected[0]) <= 1e-5


def test_two_active_adapters_fall_back(tiny):
    from peft import LoraConfig

    model = tiny.lora(tiny.base())
    model.add_adapter("other", LoraConfig(r=4, target_modules=tiny.targets, lora_dropout=0.0))
    model.base_model.set_adapter(["default", "other"])
    tiny.randomise_lora(model, seed=5)
    ids = tiny.batch()
    expected = tiny.run(model, ids, grad_of="lora_B")
    report = ensure_patched(model)
    assert {f.reason for f in report.fallbacks} == {"2 active adapters"}
    got = tiny.run(model, ids, grad_of="lora_B")
    assert tiny.rel(got[0], expected[0]) <= 1e-5


def test_disabled_adapter_is_followed_at_call_time(tiny):
    model = tiny.lora(tiny.base())
    ensure_patched(model)
    model.eval()
    ids = tiny.batch()
    with torch.no_grad():
        with model.disable_adapter():
            without = model(input_ids=ids).logits
        with_adapter = model(input_ids=ids).logits
        base = model.get_base_model()
    assert not torch.allclose(without, with_adapter)
    from adapter_doctor.runtime import unpatch

    unpatch(model)
    with torch.no_grad(), model.disable_adapter():
        assert tiny.rel(base(input_ids=ids).logits, without) <= 1e-5


def test_mlp_with_an_activation_no_kernel_computes_is_left_alone(tiny):
    model = tiny.lora(tiny.base(hidden_act="relu"))
    ids = tiny.batch()
    expected = tiny.run(model, ids)
    report = ensure_patched(model)
    assert [m.reason for m in report.skipped] == ["activation ReLU has no kernel"] * 2
    assert report.counts["LlamaMLP"] == {"skipped": 2} and report.counts["LlamaAttention"] == {"patched": 2}
    got = tiny.run(model, ids)
    assert tiny.rel(got[0], expected[0]) <= 1e-5


def test_each_projections_eligibility_is_read_once_per_patch(tiny, monkeypatch):
    from adapter_doctor.runtime import eligibility

    model = tiny.lora(tiny.base(), lora_dropout=0.1)
    asked = []
    why_not_fused = eligibility.why_not_fused
    monkeypatch.setattr(eligibility, "why_not_fused", lambda module: asked.append(module) or why_not_fused(module))
    report = ensure_patched(model)
    assert len(report.projections) == 7 * 2 and len(asked) == len(report.projections)
    assert [(f.path, f.reason) for f in report.fallbacks] == [(p.path, p.reason) for p in report.projections]
    assert {p.path_taken for p in report.projections} == {"fallback"}
