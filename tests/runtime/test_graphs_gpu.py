"""A checkpointed layer replayed as CUDA graphs trains as the eager layer does: the same losses and gradients
over steps with optimizer updates in between, after an adapter is rescaled and after the batch shape changes;
a layer that draws random numbers stays eager."""
import pytest
import torch
from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched, host_plan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def model_on_gpu(tiny, graphs, dtype=torch.float32, arch="llama", **overrides):
    model = tiny.lora(tiny.base(arch, attn="sdpa", num_hidden_layers=3, **overrides)).cuda().to(dtype)
    ensure_patched(model)
    enable_offloaded_checkpointing(model, cuda_graphs=graphs)
    return model


def train(model, batches, changes=None):
    """Losses and the final LoRA weights of an AdamW run over `batches`; changes[i](model) before step i."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for i, ids in enumerate(batches):
        if changes and i in changes:
            changes[i](model)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.cuda.synchronize()
    return torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_training(tiny, batches, changes=None, dtype=torch.float32, arch="llama", **overrides):
    eager = train(model_on_gpu(tiny, False, dtype, arch, **overrides), batches, changes)
    model = model_on_gpu(tiny, True, dtype, arch, **overrides)
    graphed = train(model, batches, changes)
    assert torch.allclose(graphed[0], eager[0], rtol=1e-6, atol=0), (graphed[0], eager[0])
    for name, weight in eager[1].items():
        assert torch.allclose(graphed[1][name], weight, rtol=1e-5, atol=1e-7), name
    return host_plan(model).graphs


def batch(tiny, seed, length=13):
    return tiny.batch(seed=seed, length=length).cuda()


def test_graphed_layers_train_as_eager_ones(tiny):
    stats = same_training(tiny, [batch(tiny, s) for s in range(5)])
    # 3 layers, forward and backward each: seen at step 1, captured at step 2, replayed from then on
    assert stats.captured == 6 and stats.replayed == 6 * 4, stats
    assert stats.eager == {"first call of its signature": 6}, stats


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])  # qwen3: recorded before its q/k norms
def test_graphed_layers_that_record_their_attention_train_as_eager_ones(tiny, monkeypatch, model_type):
    # bf16: the layers' first forwards record their attention (saved_attention.py), which the graphs replay
    from adapter_doctor.runtime import saved_attention

    recorded = []
    real = saved_attention.record
    monkeypatch.setattr(saved_attention, "record", lambda *a: recorded.append(1) or real(*a))
    stats = same_training(tiny, [batch(tiny, s) for s in range(5)], dtype=torch.bfloat16, arch=model_type)
    assert stats.captured == 6 and stats.replayed == 6 * 4, stats
    assert len(recorded) == 3 * 5 + 3 * 3  # eager: every forward; graphed: the eager two, warm-up and capture


def test_a_rescaled_adapter_and_a_new_batch_shape_are_captured_again(tiny):
    # steps 0-2, then rescaled at 3 (eager), captured at 4; the longer batches eager at 6, captured at 7
    batches = [batch(tiny, s) for s in range(6)] + [batch(tiny, s, length=21) for s in range(6, 9)]
    stats = same_training(tiny, batches, {3: lambda m: tiny.scale_lora(m, 1.5)})
    assert stats.eager == {"first call of its signature": 6, "signature changed": 12}, stats
    assert stats.captured == 6 * 3, stats


def test_a_layer_that_draws_random_numbers_runs_eagerly(tiny):
    stats = same_training(tiny, [batch(tiny, s) for s in range(3)], attention_dropout=0.1)
    assert stats.captured == 0 and stats.replayed == 0, stats
    assert stats.eager.get("draws random numbers (dropout)", 0) > 0, stats
