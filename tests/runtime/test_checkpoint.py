"""Offloaded layer checkpointing computes the same gradients as no checkpointing."""
import pytest
import torch
import transformers
from adapter_doctor.runtime import ensure_patched
from adapter_doctor.runtime.checkpoint import enable_offloaded_checkpointing
from peft import LoraConfig, get_peft_model

BATCH = torch.arange(2 * 12).reshape(2, 12) % 60 + 2


def lora_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(transformers.LlamaForCausalLM(config), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def grads(model):
    model.train()
    loss = model(input_ids=BATCH, labels=BATCH).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_checkpointing_matches_plain_training():
    loss, expected = grads(lora_llama())
    for patch in (False, True):
        model = lora_llama()
        if patch:
            ensure_patched(model)
        assert enable_offloaded_checkpointing(model) == 3
        got_loss, got = grads(model)
        assert torch.allclose(got_loss, loss)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7), name



def test_every_other_layer_checkpointed_gives_the_same_gradients():
    loss, expected = grads(lora_llama())
    model = lora_llama()
    ensure_patched(model)
    assert enable_offloaded_checkpointing(model, every_n_layers=2) == 2  # layers 0 and 2 of 3
    flags = [layer.gradient_checkpointing for layer in model.base_model.model.model.layers]
    assert flags == [True, False, True]
    got_loss, got = grads(model)
    assert torch.allclose(got_loss, loss)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_every_n_layers_must_be_a_positive_whole_number(bad):
    with pytest.raises(ValueError, match="every_n_layers"):
        enable_offloaded_checkpointing(lora_llama(), every_n_layers=bad)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("host_blocks", [None, 3])  # 3: one layer offloaded, one its input only, one kept on the GPU
def test_offloaded_checkpointing_on_the_gpu_matches_plain_training(host_blocks):
    """The CUDA path: copies to pinned memory on a side stream, prefetches back, replays with Triton kernels."""
    def on_gpu():
        model = lora_llama().cuda()
        ensure_patched(model)
        return model

    batch = BATCH.cuda()
    plain = on_gpu()
    plain.train()
    plain(input_ids=batch, labels=batch).loss.backward()
    model = on_gpu()
    budget = None if host_blocks is None else host_blocks * 4096 / 2**30
    assert enable_offloaded_checkpointing(model, host_memory_gib=budget) == 3
    losses = []  # kept, as training loops keep the last loss: its graph (and its layers' records) stays alive
    for _ in range(3):  # later steps reuse the cached pinned blocks and the side stream
        model.zero_grad(set_to_none=True)
        model.train()
        losses.append(model(input_ids=batch, labels=batch).loss)
        losses[-1].backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), model.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6), name
    if host_blocks is not None:
        from adapter_doctor.runtime import host_plan

        plan = host_plan(model)
        assert (plan.layers_offloaded, plan.layers_input_only, plan.layers_on_device) == (3, 3, 3)  # 3 steps


def test_a_host_budget_keeps_what_fits_and_the_gradients_stay_exact():
    from adapter_doctor.runtime import host_plan

    loss, expected = grads(lora_llama())
    model = lora_llama()
    ensure_patched(model)
    # Each layer saves its input and its inner residual sum, 2x12x32 fp32 each: 3,072 bytes, pinned as 4,096.
    # Three blocks of room: layer 0 keeps both, layer 1 its input alone, layer 2 nothing on the host.
    enable_offloaded_checkpointing(model, host_memory_gib=3 * 4096 / 2**30)
    got_loss, got = grads(model)
    plan = host_plan(model)
    assert (plan.layers_offloaded, plan.layers_input_only, plan.layers_on_device) == (1, 1, 1)
    assert plan.peak == plan.limit == 3 * 4096
    assert plan.held == 0  # every layer's share given back by its backward
    assert torch.allclose(got_loss, loss)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7), name


def test_the_default_host_budget_is_most_of_the_available_memory_and_is_returned_by_abandoned_steps():
    from adapter_doctor.runtime import host_plan
    from adapter_doctor.runtime.checkpoint import available_host_memory

    model = lora_llama()
    ensure_patched(model)
    enable_offloaded_checkpointing(model)
    plan = host_plan(model)
    available = available_host_memory()
    assert available and 0.8 * available < plan.limit <= 0.9 * available
    model.train()
    loss = model(input_ids=BATCH, labels=BATCH).loss  # a forward whose backward never comes
    assert plan.layers_offloaded == 3 and plan.held == 3 * 2 * 4096
    del loss
    import gc

    gc.collect()
    assert plan.held == 0


@pytest.mark.parametrize("bad", [0, -2.0])
def test_host_memory_gib_must_be_positive(bad):
    with pytest.raises(ValueError, match="host_memory_gib"):
        enable_offloaded_checkpointing(lora_llama(), host_memory_gib=bad)
