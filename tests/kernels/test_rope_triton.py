"""The Triton RoPE against rope_reference: q and k rotated in place where they lie (transposed views of the
projections' outputs, as the attention passes them), gradients rotated back in place, cos/sin from
transformers' own rotary modules (default and llama3-scaled, with position ids and a broadcast batch).

Tolerances. fp32: the kernel computes x1·c − x2·s in fp32 as torch does, up to operation order: 1e-6.
bf16: the kernel rounds once from fp32 where the reference rounds each product and then the sum, so an
element may differ by a rounding of each (2 ulps, 2·2^-7 relative to the largest term); 1e-2 in norm.
"""
import pytest
import torch
from adapter_doctor.kernels.rope import rope, rope_reference, rope_triton

B, H, KV, S, D = 2, 5, 3, 13, 18  # odd heads and sequence; half of head_dim (9) is not a power of two
BF16_ULP = 2.0**-7
SCALINGS = {"default": None, "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}


def angles(device, dtype, scaling="default", batch=B):
    """cos, sin as transformers' Llama rotary module computes them for shifted position ids."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=KV, head_dim=D,
                         max_position_embeddings=64, rope_theta=10000.0, rope_scaling=SCALINGS[scaling])
    positions = torch.arange(S)[None] + 5 * torch.arange(batch)[:, None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=dtype), positions)
    return cos.to(device), sin.to(device)


def projections(device, dtype, seed=0):
    """q, k as the attention produces them: transposed views of [B, S, heads·D] projection outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, 16, generator=g).to(device, dtype).requires_grad_()
    wq, wk = (torch.randn(n * D, 16, generator=g).to(device, dtype) for n in (H, KV))
    q = (x @ wq.T).view(B, S, H, D).transpose(1, 2)
    k = (x @ wk.T).view(B, S, KV, D).transpose(1, 2)
    return x, q, k


def run(fn, device, dtype, cos, sin, seed=0):
    x, q, k = projections(device, dtype, seed)
    q2, k2 = fn(q, k, cos, sin)
    g = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(t.shape, generator=g).to(device, dtype) for t in (q2, k2)]
    ((q2 * weights[0]).sum() + (k2 * weights[1]).sum()).backward()
    return q2.detach().clone(), k2.detach().clone(), x.grad


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("cos_batch", [B, 1])
def test_fp32_matches_the_reference(device, scaling, cos_batch):
    cos, sin = angles(device, torch.float32, scaling, cos_batch)
    ours, ref = run(rope_triton, device, torch.float32, cos, sin), run(rope_reference, device, torch.float32, cos, sin)
    tol = 1e-5 if device == "cuda" else 1e-6  # the GPU contracts multiply-adds (FMA): a few ulps apart
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_bf16_within_rounding(rel, device):
    cos, sin = angles(device, torch.bfloat16, "llama3")
    ours, ref = run(rope_triton, device, torch.bfloat16, cos, sin), run(rope_reference, device, torch.bfloat16, cos, sin)
    for a, b in zip(ours[:2], ref[:2]):
        bound = 2 * BF16_ULP * b.float().abs().amax(-1, keepdim=True)
        assert ((a.float() - b.float()).abs() <= bound).all()
        assert rel(a, b) < 1e-2
    assert rel(ours[2], ref[2]) < 1e-2


def test_rotates_in_place_where_the_projections_wrote(device):
    cos, sin = angles(device, torch.float32)
    _, q, k = projections(device, torch.float32)
    expected = rope_reference(q.detach(), k.detach(), cos, sin)
    q2, k2 = rope_triton(q, k, cos, sin)
    assert q2.data_ptr() == q.data_ptr() and k2.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, expected[0], rtol=1e-6, atol=1e-6)  # the projection's buffer holds the result
    torch.testing.assert_close(k2, expected[1], rtol=1e-6, atol=1e-6)


def test_leaves_that_require_grad_are_not_modified(device):
    # Autograd owns a leaf's data, so it is copied first; a tensor outside autograd is rotated where it lies.
    cos, sin = angles(device, torch.float32)
    q = torch.randn(B, H, S, D, device=device, requires_grad=True)
    k = torch.randn(B, KV, S, D, device=device)
    q0, k0 = q.detach().clone(), k.clone()
    q2, _ = rope_triton(q, k, cos, sin)
    q2.sum().backward()
    assert torch.equal(q.detach(), q0)
    torch.testing.assert_close(k, rope_reference(q0, k0, cos, sin)[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q2, rope_reference(q0, k0, cos, sin)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.grad, rope_reference(torch.ones_like(q0), k0, cos, -sin)[0], rtol=1e-6, atol=1e-6)


def test_saves_only_cos_and_sin(device, saved_activation_bytes):
    cos, sin = angles(device, torch.float32)
    _, q, k = projections(device, torch.float32)
    assert saved_activation_bytes(lambda: rope_triton(q, k, cos, sin)) == cos.nbytes + sin.nbytes


def test_an_expanded_gradient_is_copied_before_it_is_rotated(device):
    # q2.sum() hands back a stride-0 gradient: rotating it where it lies would overwrite one element many times.
    cos, sin = angles(device, torch.float32)
    grads = []
    for fn in (rope_triton, rope_reference):
        x, q, k = projections(device, torch.float32)
        q2, k2 = fn(q, k, cos, sin)
        (q2.sum() + 2 * k2.sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_a_backward_that_saved_the_unrotated_q_fails_loudly(device):
    cos, sin = angles(device, torch.float32)
    x, q, k = projections(device, torch.float32)
    squared = q * q  # saves the unrotated q for its backward
    q2, _ = rope_triton(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (squared.sum() + q2.sum()).backward()


def test_dispatch_takes_the_reference_off_cuda():
    cos, sin = angles("cpu", torch.float32)
    _, q, k = projections("cpu", torch.float32)
    q0 = q.detach().clone()
    for a, b in zip(rope(q, k, cos, sin), rope_reference(q, k, cos, sin)):
        assert torch.equal(a, b)
    assert torch.equal(q.detach(), q0)


# ---- GPU, Llama-3.1-8B shapes (32/8 heads, head dim 128, batch 4 x seq 2048) in bf16 -----------------------

@pytest.mark.gpu
def test_gpu_llama8b_shape_bf16(rel, cuda):
    # Bound: a rotation of bf16 values rounded once vs three times: 1e-2 in norm, q, k and their gradient.
    batch, seq, heads, kv, dim = 4, 2048, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    emb = torch.arange(seq, device="cuda").float()[:, None] * inv_freq
    emb = torch.cat((emb, emb), -1)[None]
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    base_q = torch.randn(batch, seq, heads * dim, device="cuda", generator=g).bfloat16()
    base_k = torch.randn(batch, seq, kv * dim, device="cuda", generator=g).bfloat16()
    grad_q = torch.randn(batch, heads, seq, dim, device="cuda", generator=g).bfloat16()
    results = []
    for fn in (rope_triton, rope_reference):
        pq, pk = base_q.clone().requires_grad_(), base_k.clone().requires_grad_()
        q = (pq * 1).view(batch, seq, heads, dim).transpose(1, 2)
        k = (pk * 1).view(batch, seq, kv, dim).transpose(1, 2)
        q2, k2 = fn(q, k, cos, sin)
        (q2 * grad_q).sum().backward(inputs=[pq])
        results.append((q2.detach().clone(), k2.detach().clone(), pq.grad))
        torch.cuda.synchronize()
    for a, b in zip(*results):
        assert rel(a, b) < 1e-2
