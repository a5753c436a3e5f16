"""A checkpointed layer's MLP in chunks of tokens: the same loss and gradients, a chunk's tensors at a time."""
import dataclasses

import pytest
import torch
from adapter_doctor.kernels import TORCH, TRITON
from adapter_doctor.runtime import chunked_mlp as chunking
from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched


def spied(sizes, kernels=TORCH):
    """`kernels` (the torch set by default), recording the rows of every gated activation it computes."""
    def swiglu(gate, up):
        sizes.append(gate.numel() // gate.shape[-1])
        return kernels.swiglu(gate, up)

    def geglu(gate, up, approximate="tanh"):
        sizes.append(gate.numel() // gate.shape[-1])
        return kernels.geglu(gate, up, approximate)

    return dataclasses.replace(kernels, swiglu=swiglu, geglu=geglu)


def step(tiny, model, ids):
    """(loss, LoRA gradients) of one training step: the forward with labels and the backward, nothing more."""
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("targets", ["all", "attention only"])
def test_every_architecture_gives_the_same_loss_and_gradients_in_chunks(tiny, arch, targets, monkeypatch):
    # 2 x 13 = 26 rows in chunks of 4: six whole chunks and one of 2. Gemma 2 and 3 norm the MLP's output (its
    # value is read in the replay); Phi-3's gate and up are one projection.
    monkeypatch.setattr(chunking, "CHUNK_TOKENS", 4)
    options = {} if targets == "all" else {"target_modules": ["q_proj", "v_proj", "qkv_proj"]}
    ids = tiny.batch()
    plain = tiny.lora(tiny.base(arch), **options)
    expected = step(tiny, plain, ids)
    model = tiny.lora(tiny.base(arch), **options)
    sizes = []
    assert not ensure_patched(model, kernels=spied(sizes)).fallbacks
    enable_offloaded_checkpointing(model)
    loss, grads = step(tiny, model, ids)
    assert sizes and max(sizes) == 4 and 2 in sizes  # every activation a chunk's, in forward and backward
    assert tiny.rel(loss, expected[0]) < 1e-5
    assert grads.keys() == expected[1].keys() and grads
    for name, grad in expected[1].items():
        assert tiny.rel(grads[name], grad) < 1e-4, name


def test_under_autocast_the_chunks_recompute_in_the_forwards_dtypes(tiny, monkeypatch):
    # An fp32 model with the forward under bf16 autocast, as Trainer runs it: the chunks' backward runs after
    # the layer's replay, outside any autocast block, and restores the forward's, so every gated activation,
    # in the first forward, the replay and the chunks' recomputation, sees the bf16 gate the forward saw.
    monkeypatch.setattr(chunking, "CHUNK_TOKENS", 4)
    ids, dtypes = tiny.batch(), []

    def swiglu(gate, up):
        dtypes.append(gate.dtype)
        return TORCH.swiglu(gate, up)

    model = tiny.lora(tiny.base("llama"))
    ensure_patched(model, kernels=dataclasses.replace(TORCH, swiglu=swiglu))
    enable_offloaded_checkpointing(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    forward = len(dtypes)
    loss.backward()
    assert forward and len(dtypes) > forward  # the backward recomputed chunks
    assert set(dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_layers_replayed_in_full_chunk_their_mlp_too(tiny, model_type, monkeypatch):
    # Room on the host for the two layers' inputs only (2 x 13 x 64 fp32, pinned as 8 KiB each): both replay
    # in full, their MLP output feeding a real residual sum.
    from adapter_doctor.runtime import host_plan

    monkeypatch.setattr(chunking, "CHUNK_TOKENS", 4)
    ids = tiny.batch()
    expected = step(tiny, tiny.lora(tiny.base(model_type)), ids)
    model = tiny.lora(tiny.base(model_type))
    sizes = []
    ensure_patched(model, kernels=spied(sizes))
    enable_offloaded_checkpointing(model, host_memory_gib=2 * 8192 / 2**30)
    loss, grads = step(tiny, model, ids)
    assert host_plan(model).layers_input_only == 2
    assert max(sizes) == 4
    assert tiny.rel(loss, expected[0]) < 1e-5
    for name, grad in expected[1].items():
        assert tiny.rel(grads[name], grad) < 1e-4, name


def test_the_chunks_replay_the_projection_paths_the_forward_took(tiny, monkeypatch):
    # Each projection is read once, in the layer's first forward, and the chunks' recomputation takes those parts:
    # a scaling changed in between does not reach the gradients (read again, it would scale them by 3).
    from adapter_doctor.runtime import projection

    monkeypatch.setattr(chunking, "CHUNK_TOKENS", 4)
    ids = tiny.batch()
    expected = step(tiny, tiny.lora(tiny.base("llama")), ids)[1]
    model = tiny.lora(tiny.base("llama"))
    ensure_patched(model, kernels=TORCH)
    enable_offloaded_checkpointing(model)
    reads = []
    real = projection.lora_parts
    monkeypatch.setattr(projection, "lora_parts", lambda m: reads.append(m) or real(m))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    tiny.scale_lora(model, 3)
    loss.backward()
    projections = [m for name, m in model.named_modules() if name.endswith("_proj") and hasattr(m, "lora_A")]
    assert sorted(map(id, reads)) == sorted(map(id, projections))  # once each, in the forward only
    for name, grad in expected.items():
        assert tiny.rel(model.get_parameter(name).grad, grad) < 1e-4, name


def test_an_mlp_with_dropout_runs_whole_and_its_gradients_follow_its_masks(tiny, monkeypatch):
    # LoRA dropout draws masks; a chunk recomputed in the backward, outside the checkpoint's restored RNG,
    # would draw others. The checkpoint's own replay draws the same ones: exact against the plain step.
    monkeypatch.setattr(chunking, "CHUNK_TOKENS", 4)
    ids = tiny.batch()
    plain = tiny.lora(tiny.base(), lora_dropout=0.1)
    torch.manual_seed(7)
    expected = step(tiny, plain, ids)
    model = tiny.lora(tiny.base(), lora_dropout=0.1)
    sizes = []
    ensure_patched(model, kernels=spied(sizes))
    enable_offloaded_checkpointing(model)
    torch.manual_seed(7)
    loss, grads = step(tiny, model, ids)
    assert set(sizes) == {26}
    assert tiny.rel(loss, expected[0]) < 1e-5
    for name, grad in expected[1].items():
        assert tiny.rel(grads[name], grad) < 1e-4, name


def test_short_inputs_and_layers_outside_a_checkpoint_run_whole(tiny, monkeypatch):
    monkeypatch.setattr(chunking, "CHUNK_TOKENS", 14)  # 26 rows are under two chunks: whole
    ids = tiny.batch()
    for checkpointed in (True, False):
        model = tiny.lora(tiny.base())
        sizes = []
        ensure_patched(model, kernels=spied(sizes))
        if checkpointed:
            enable_offloaded_checkpointing(model)
        step(tiny, model, ids)
        assert set(sizes) == {26}
    monkeypatch.setattr(chunking, "CHUNK_TOKENS", 4)  # long enough now, but not checkpointed: whole
    sizes = []
    model = tiny.lora(tiny.base())
    ensure_patched(model, kernels=spied(sizes))
    step(tiny, model, ids)
    assert set(sizes) == {26}


@pytest.mark.parametrize("chunk", [4, 14])
def test_no_tensor_saved_for_the_backward_holds_more_than_a_chunk_of_the_intermediate_size(tiny, monkeypatch,
                                                                                            chunk):
    # 14: under two chunks, so the MLP runs whole and its replay saves gate and up for all 26 rows.
    monkeypatch.setattr(chunking, "CHUNK_TOKENS", chunk)
    model = tiny.lora(tiny.base(intermediate_size=96))  # not the vocabulary's 128, which the logits have
    ensure_patched(model, kernels="torch")
    enable_offloaded_checkpointing(model)
    intermediate = model.config.intermediate_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = []

    def pack(t):  # activations of the intermediate size: the weights (down_proj's, its LoRA A) are not
        if t.dim() and t.shape[-1] == intermediate and t.untyped_storage().data_ptr() not in weights:
            rows.append(t.numel() // intermediate)
        return t

    model.train()
    ids = tiny.batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the replay saves in the backward
        model(input_ids=ids, labels=ids).loss.backward()
    assert rows and max(rows) == (4 if chunk == 4 else 26)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("host_gib", [None, 2 * 8192 / 2**30], ids=["offloaded", "inputs only"])
def test_on_the_gpu_the_fused_kernels_in_chunks_match_plain_training(tiny, host_gib, monkeypatch):
    # The CUDA path: the fused LoRA Functions and the Triton SwiGLU run chunk by chunk, in layers replayed
    # with their recorded sum and in layers replayed in full.
    from adapter_doctor.runtime import host_plan

    monkeypatch.setattr(chunking, "CHUNK_TOKENS", 4)
    ids = tiny.batch().cuda()
    plain = tiny.lora(tiny.base()).cuda()
    assert not ensure_patched(plain).fallbacks  # every projection through the fused LoRA Function
    expected = step(tiny, plain, ids)
    model = tiny.lora(tiny.base()).cuda()
    sizes = []
    assert not ensure_patched(model, kernels=spied(sizes, TRITON)).fallbacks
    enable_offloaded_checkpointing(model, host_memory_gib=host_gib)
    loss, grads = step(tiny, model, ids)
    assert max(sizes) == 4 and 2 in sizes
    assert host_plan(model).layers_input_only == (0 if host_gib is None else 2)
    assert tiny.rel(loss, expected[0]) < 1e-5
    assert grads.keys() == expected[1].keys() and grads
    for name, grad in expected[1].items():
        assert tiny.rel(grads[name], grad) < 1e-4, name
