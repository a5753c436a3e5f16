"""Selective replay in checkpointed layers: exact gradients, and o_proj/down_proj GEMMs left out."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from adapter_doctor.kernels import TORCH, lora_linear
from adapter_doctor.runtime import ensure_patched
from adapter_doctor.runtime.checkpoint import enable_offloaded_checkpointing
from adapter_doctor.runtime.replay import residual_add
from adapter_doctor.runtime.tape import REPLAY, Tape, taping

IDS = torch.arange(2 * 10).reshape(2, 10) % 100 + 3
# The references everywhere but the fused gradient-only projection, which runs on any device.
SKIPPING = dataclasses.replace(TORCH, name="torch+gradient-only",
                               lora_linear_gradient_only=lora_linear.lora_linear_gradient_only)


def lora_grads(model):
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_lora(tiny, family):
    return tiny.lora(tiny.base(family))  # lora_B randomised: PEFT's zeros would make every dA zero


@pytest.mark.parametrize("kernels", [TORCH, SKIPPING], ids=["torch", "gradient-only"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])  # gemma2: sandwich norms, outputs not deferred
def test_checkpointed_patched_layers_give_the_plain_gradients(tiny, family, kernels):
    expected = lora_grads(tiny_lora(tiny, family))
    model = tiny_lora(tiny, family)
    ensure_patched(model, kernels=kernels)
    assert enable_offloaded_checkpointing(model) == 2
    got = lora_grads(model)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("kernels", [TORCH, SKIPPING], ids=["torch", "gradient-only"])
def test_the_replay_runs_no_output_projection_gemm_with_the_fused_set(tiny, monkeypatch, kernels):
    model = tiny_lora(tiny, "llama")
    ensure_patched(model, kernels=kernels)
    enable_offloaded_checkpointing(model)
    names = {m.base_layer.weight.data_ptr(): name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if name.endswith(("q_proj", "o_proj", "down_proj"))}
    used = []
    real = F.linear

    def recording(x, weight, bias=None):
        used.append(names.get(weight.data_ptr()))
        return real(x, weight, bias)

    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    monkeypatch.setattr(F, "linear", recording)
    loss.backward()
    # both layers replay q_proj with its value; with the fused gradient-only projection o_proj and down_proj
    # never compute theirs, while the pure reference set computes them (it is the kernel set that decides)
    assert used.count("q_proj") == 2
    skipped = "o_proj" not in used and "down_proj" not in used
    assert skipped == (kernels is SKIPPING)


def test_a_replay_that_takes_another_path_fails_loudly():
    x = torch.ones(2, 3)
    with taping(Tape(REPLAY)), pytest.raises(RuntimeError, match="different path"):
        residual_add(x, x, last=False)


def test_outside_a_checkpoint_the_sum_is_a_sum():
    x = torch.arange(3.0)
    assert torch.equal(residual_add(x, x, last=True), 2 * x)


def test_a_gradient_only_projection_has_the_projections_gradients():
    torch.manual_seed(0)
    x = torch.randn(5, 8, requires_grad=True)
    w, a, b = torch.randn(6, 8), torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    dy = torch.randn(5, 6)
    parts = lora_linear.LoraParts(w, None, a, b, 0.5)
    (placeholder,) = lora_linear.lora_linear_gradient_only(x, [parts])
    assert placeholder.shape == (5, 6) and placeholder.stride() == (0, 0)
    got = torch.autograd.grad(placeholder, (x, a, b), dy)
    want = torch.autograd.grad(lora_linear.lora_linear_reference(x, *parts), (x, a, b), dy)
    for g, e in zip(got, want):
        assert torch.allclose(g, e, atol=1e-5)


def checkpointed(tiny):
    """The tiny llama, patched with the gradient-only projection, its layers checkpointed, in training mode."""
    model = tiny_lora(tiny, "llama")
    ensure_patched(model, kernels=SKIPPING)
    enable_offloaded_checkpointing(model)
    model.train()
    return model


def test_the_replay_reads_no_projection_twice(tiny, monkeypatch):
    from adapter_doctor.runtime import projection

    model = checkpointed(tiny)
    reads = []
    real = projection.lora_parts
    monkeypatch.setattr(projection, "lora_parts", lambda m: reads.append(m) or real(m))
    model(input_ids=IDS, labels=IDS).loss.backward()
    projections = [m for name, m in model.named_modules() if name.endswith("_proj") and hasattr(m, "lora_A")]
    assert len(projections) == 14  # 7 in each of the two layers
    assert sorted(map(id, reads)) == sorted(map(id, projections))  # once each, in the forward only


def test_the_replay_computes_what_the_forward_computed(tiny):
    # An adapter's scaling changed between the forward and the backward: the gradients are still those of the
    # function the forward computed (a replay that read the layers again would scale them by 3).
    expected = lora_grads(tiny_lora(tiny, "llama"))
    model = checkpointed(tiny)
    loss = model(input_ids=IDS, labels=IDS).loss
    tiny.scale_lora(model, 3)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


def test_parameters_rebound_after_the_forward_get_the_gradients(tiny):
    # A wrapper may swap a layer's parameter objects between forward and backward (same values, new objects):
    # the replay then reads the projections again, and the gradients reach the parameters the layer holds now.
    expected = lora_grads(tiny_lora(tiny, "llama"))
    model = checkpointed(tiny)
    loss = model(input_ids=IDS, labels=IDS).loss
    stale = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.requires_grad:
            stale.append(m.weight)
            m.weight = torch.nn.Parameter(m.weight.detach().clone())
    loss.backward()
    assert len(stale) == 28 and all(p.grad is None for p in stale)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert got[name] is not None and torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


def test_an_adapter_switched_after_the_forward_gets_no_gradients(tiny):
    # set_adapter between forward and backward flips requires_grad flags but swaps no parameter: the replay
    # still computes the forward's function, and the adapter switched to, absent from it, gets no gradient.
    from peft import LoraConfig

    def two_adapters():
        model = tiny_lora(tiny, "llama")
        model.add_adapter("other", LoraConfig(r=8, lora_alpha=16, target_modules=tiny.targets, lora_dropout=0.0))
        tiny.randomise_lora(model, 5)
        model.base_model.set_adapter("default")
        return model

    def step(model):
        model.train()
        loss = model(input_ids=IDS, labels=IDS).loss
        model.base_model.set_adapter("other")
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    expected = step(two_adapters())
    model = two_adapters()
    ensure_patched(model, kernels=SKIPPING)
    enable_offloaded_checkpointing(model)
    got = step(model)
    assert [n for n in got if ".other." in n and got[n] is not None] == []
    for name, grad in expected.items():
        assert (got[name] is None) == (grad is None), name
        assert grad is None or torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name
