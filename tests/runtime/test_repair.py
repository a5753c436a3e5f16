"""Repair: modules whose foreign forward reads attributes they lack get our implementation, reported as such.

The process-wide class patch is the real scenario (tests/runtime/test_scenario.py, which restores the class);
here the same breakage comes from an instance-level forward and from a throwaway subclass, so no
transformers class is touched.
"""
import types

import pytest
import torch
from adapter_doctor.runtime import PatchError, ensure_patched, unpatch
from transformers.models.llama.modeling_llama import LlamaAttention


def fast_attention(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    # What a class-patching runtime's forward does: hooks only its own loader attaches to instances.
    q, k, v = self.apply_qkv(self, hidden_states)
    raise AssertionError("never reached: the instances lack apply_qkv")


class FastLlamaAttention(LlamaAttention):
    forward = fast_attention


def attentions(model):
    return [m for m in model.modules() if isinstance(m, LlamaAttention)]


def repaired_equals_clean(tiny, model, clean):
    ids = tiny.batch()
    with pytest.raises(AttributeError, match="apply_qkv"):
        model(input_ids=ids)
    report = ensure_patched(model)
    assert [m.module_type for m in report.repaired] == ["LlamaAttention", "LlamaAttention"]
    assert all("apply_qkv" in m.reason and "fast_attention" in m.replaced for m in report.repaired)
    assert report.changed == 12 and not report.failures
    got, expected = tiny.run(model, ids), tiny.run(clean, ids)
    assert tiny.rel(got[0], expected[0]) <= 1e-5
    assert max(tiny.rel(got[2][n], expected[2][n]) for n in expected[2]) <= 1e-4
    return report


def test_instance_level_foreign_forward_is_repaired_and_restored(tiny):
    model, clean = tiny.lora(tiny.base()), tiny.lora(tiny.base())
    foreign = {}
    for attn in attentions(model):
        attn.forward = foreign[attn] = types.MethodType(fast_attention, attn)
    repaired_equals_clean(tiny, model, clean)
    assert all("forward" not in vars(attn) for attn in attentions(model))
    unpatch(model)
    assert all(vars(attn)["forward"] is foreign[attn] for attn in attentions(model))
    assert all("_adapter_doctor_saved" not in vars(attn) for attn in attentions(model))


def test_swapped_in_foreign_subclass_is_repaired_and_restored(tiny):
    model, clean = tiny.lora(tiny.base()), tiny.lora(tiny.base())
    for attn in attentions(model):
        attn.__class__ = FastLlamaAttention
    repaired_equals_clean(tiny, model, clean)
    assert all(type(attn).__mro__[1] is FastLlamaAttention for attn in attentions(model))
    unpatch(model)
    assert all(type(attn) is FastLlamaAttention for attn in attentions(model))


def test_working_foreign_forward_is_replaced_not_repaired(tiny):
    model = tiny.lora(tiny.base())
    mlp = model.get_base_model().model.layers[0].mlp
    mlp.forward = types.MethodType(lambda self, x: self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)),
                                   mlp)
    report = ensure_patched(model)
    entry = next(m for m in report.patched if m.path.endswith("layers.0.mlp"))
    assert "<lambda>" in entry.replaced and not report.repaired


def test_broken_module_without_a_spec_gets_the_library_forward_back(tiny):
    model, clean = tiny.lora(tiny.base()), tiny.lora(tiny.base())
    rotary = model.get_base_model().model.rotary_emb
    foreign = types.MethodType(lambda self, x, position_ids: self.extend_rope_embedding(x), rotary)
    rotary.forward = foreign
    report = ensure_patched(model)
    (restored,) = report.restored
    assert restored.path == "base_model.model.model.rotary_emb" and "extend_rope_embedding" in restored.reason
    assert "forward" not in vars(rotary) and not report.failures
    ids = tiny.batch()
    got, expected = tiny.run(model, ids), tiny.run(clean, ids)
    assert tiny.rel(got[0], expected[0]) <= 1e-5
    unpatch(model)
    assert vars(rotary)["forward"] is foreign


def test_a_module_left_broken_raises_before_anything_changes(tiny):
    class Custom(torch.nn.Module):  # not a library class: its own forward is all there is to go back to,
        def forward(self, x):  # and it needs what the instance lacks too
            return self.scale * x

    model = tiny.lora(tiny.base())
    extra = model.get_base_model().model.extra = Custom()
    extra.forward = types.MethodType(lambda self, x: self.missing_weight @ x, extra)
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(PatchError, match="missing_weight"):
        ensure_patched(model)
    assert {name: type(m) for name, m in model.named_modules()} == before
