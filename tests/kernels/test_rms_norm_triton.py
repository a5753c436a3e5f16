"""The Triton RMSNorm against rms_norm_reference: forward, dx and dw, both rounding orders, what it saves, and
when backward may reuse dy's buffer.

Tolerances. fp32: the kernel sums x² in another order than torch, so results differ by a few fp32 roundings:
1e-5 relative. bf16 forward: the kernel rounds where the reference rounds (the normalised value, then the
product, in the Llama order; the fp32 product once in the Gemma order), so outputs are equal except where the
fp32 values straddle a rounding boundary after differing in their last bits: at most 1 ulp (2^-7 relative),
on under 1% of the elements. bf16 gradients: the kernel keeps fp32 where autograd rounds intermediate
products to bf16, so they differ by about that rounding: 1e-2 relative in norm.
"""
import pytest
import torch
from adapter_doctor.kernels.rms_norm import (
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
    rms_norm_reference,
    rms_norm_triton,
)

BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one ulp is 2^-7 of the value's leading power of two
ORDERS = {"llama": (0.0, False), "gemma": (1.0, True), "offset-llama-order": (1.0, False)}
SHAPE = (3, 13, 67)  # 39 rows of 67: neither a power of two nor a multiple of a block


def inputs(device, dtype, seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(SHAPE, generator=g)).to(device, dtype)
    w = (1 + 0.3 * torch.randn(SHAPE[-1], generator=g)).to(device, weight_dtype or dtype)
    dy = torch.randn(SHAPE, generator=g).to(device, dtype)
    return x, w, dy


def run(fn, x, w, dy, order, train_weight=True):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_(train_weight)
    y = fn(x, w, 1e-6, *ORDERS[order])
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("order", ORDERS)
def test_fp32_matches_the_reference(device, poisoned, order):
    x, w, dy = inputs(device, torch.float32)
    ours, ref = run(rms_norm_triton, x, w, dy, order), run(rms_norm_reference, x, w, dy, order)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ORDERS)
def test_bf16_rounds_where_the_reference_rounds(rel, device, poisoned, order):
    x, w, dy = inputs(device, torch.bfloat16, seed=1)
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = run(rms_norm_triton, x, w, dy, order), run(rms_norm_reference, x, w, dy, order)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=BF16_ULP, atol=0)
    assert (y != y_ref).float().mean() < 0.01
    assert rel(dx, dx_ref) < 1e-2 and rel(dw, dw_ref) < 1e-2


def test_the_two_orders_round_differently_and_each_matches_its_own(device):
    # Offset 1 in bf16: scaling before or after the cast gives different bf16 values for many elements; the
    # kernel must follow the order it is asked for, not the other one.
    x, w, _ = inputs(device, torch.bfloat16, seed=2)
    llama_order = rms_norm_reference(x, w, 1e-6, 1.0, False)
    gemma_order = rms_norm_reference(x, w, 1e-6, 1.0, True)
    assert (llama_order != gemma_order).float().mean() > 0.05
    for scale_in_fp32, ref, other in ((False, llama_order, gemma_order), (True, gemma_order, llama_order)):
        ours = rms_norm_triton(x, w, 1e-6, 1.0, scale_in_fp32)
        assert (ours != ref).float().mean() < 0.01 < (ours != other).float().mean()


def test_fp32_weight_on_bf16_input_promotes_like_llama(rel, device):
    # LlamaRMSNorm returns weight * x.to(bf16): an fp32 weight makes the output fp32.
    x, w, dy = inputs(device, torch.bfloat16, weight_dtype=torch.float32)
    ours, ref = run(rms_norm_triton, x, w, dy.float(), "llama"), run(rms_norm_reference, x, w, dy.float(), "llama")
    assert ours[0].dtype == ref[0].dtype == torch.float32
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)  # the bf16 rounding is the same
    assert rel(ours[1], ref[1]) < 1e-2 and rel(ours[2], ref[2]) < 1e-5


def test_frozen_weight_gets_no_gradient(device):
    x, w, dy = inputs(device, torch.float32)
    y, dx, dw = run(rms_norm_triton, x, w, dy, "llama", train_weight=False)
    assert dw is None
    torch.testing.assert_close(dx, run(rms_norm_reference, x, w, dy, "llama")[1], rtol=1e-5, atol=1e-5)


def test_saves_the_input_and_one_fp32_rstd_per_row(device, saved_activation_bytes):
    x, w, _ = inputs(device, torch.bfloat16)
    x.requires_grad_()
    w.requires_grad_()
    rows = x.numel() // x.shape[-1]
    ours = saved_activation_bytes(lambda: rms_norm_triton(x, w, 1e-6), w)
    assert ours == x.numel() * x.element_size() + rows * 4
    assert ours < saved_activation_bytes(lambda: rms_norm_reference(x, w, 1e-6), w)


def test_backward_reuses_dy_only_when_allowed(device):
    x, w, dy = inputs(device, torch.float32)
    rows = x.reshape(-1, x.shape[-1])
    _, rstd = rms_norm_forward(rows, w, 1e-6)
    expected = run(rms_norm_reference, x, w, dy, "llama")[1].reshape(rows.shape)
    kept = dy.clone()
    dx, _ = rms_norm_backward(kept, rows, w, rstd, 0.0, False, in_place=False, need_dw=False)
    assert dx.data_ptr() != kept.data_ptr() and torch.equal(kept, dy)
    reused = dy.clone()
    dx, _ = rms_norm_backward(reused, rows, w, rstd, 0.0, False, in_place=True, need_dw=False)
    assert dx.data_ptr() == reused.data_ptr()
    torch.testing.assert_close(dx, expected, rtol=1e-5, atol=1e-5)


def test_in_place_backward_through_autograd_is_correct(device):
    # A norm feeding a projection: the projection's backward hands dy over, and dx may take its place.
    x, w, _ = inputs(device, torch.float32)
    proj = torch.randn(SHAPE[-1], 29, generator=torch.Generator().manual_seed(4)).to(device)
    grads = []
    for fn in (lambda *a: rms_norm_triton(*a, in_place=True), rms_norm_reference):
        xx = x.clone().requires_grad_()
        (fn(xx, w, 1e-6) @ proj).square().sum().backward()
        grads.append(xx.grad)
    atol = 5e-5 if device == "cuda" else 1e-5  # the GPU contracts multiply-adds (FMA): a few ulps of a sum of 29
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=atol)


def test_default_keeps_dy_intact_for_a_residual_branch(device):
    # Gemma-2's sandwich norm: the norm's output goes straight into a residual add, whose backward hands one
    # gradient tensor to both branches. The default must not overwrite it.
    x, w, dy = inputs(device, torch.float32)
    grads = []
    for fn in (rms_norm_triton, rms_norm_reference):
        xx, residual = x.clone().requires_grad_(), x.clone().mul(0.5).requires_grad_()
        (fn(xx, w, 1e-6) + residual).backward(dy)
        grads.append((xx.grad, residual.grad))
    torch.testing.assert_close(grads[0][1], dy)
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)


def test_expanded_and_strided_gradients(device):
    # y.sum() gives an expanded (stride 0) gradient; a transposed input has a non-unit last stride.
    x, w, _ = inputs(device, torch.float32)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    results = []
    for fn in (rms_norm_triton, rms_norm_reference):
        xx = xt.clone().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
        fn(xx, w, 1e-6).sum().backward()
        results.append(xx.grad)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_dispatch_takes_the_reference_off_cuda():
    x, w, _ = inputs("cpu", torch.float32)
    assert torch.equal(rms_norm(x, w, 1e-6, in_place=True), rms_norm_reference(x, w, 1e-6))


# ---- GPU, Llama-3.1-8B shapes (hidden 4096, batch 4 x seq 2048) in bf16 ----------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("order", ["llama", "gemma"])
def test_gpu_llama8b_shape_bf16(rel, cuda, order):
    # Bounds: y within 2 ulps (a rounding boundary on the GPU) and equal on 99% of the elements; dx and dw (a sum over 8192 rows)
    # within 1e-2 in norm.
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 2048, 4096, device="cuda", generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(4096, device="cuda", generator=g)).bfloat16()
    dy = torch.randn(x.shape, device="cuda", generator=g).bfloat16()
    ours, ref = run(rms_norm_triton, x, w, dy, order), run(rms_norm_reference, x, w, dy, order)
    torch.testing.assert_close(ours[0], ref[0], rtol=2 * BF16_ULP, atol=0)  # 11 of 33M were 2 ulps off on an H100
    assert (ours[0] != ref[0]).float().mean() < 0.01
    assert rel(ours[1], ref[1]) < 1e-2
    assert rel(ours[2], ref[2]) < 1e-2


@pytest.mark.gpu
def test_gpu_saved_memory_is_input_plus_rstd(cuda, saved_activation_bytes):
    x = torch.randn(4, 2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    assert saved_activation_bytes(lambda: rms_norm_triton(x, w, 1e-6), w) == x.numel() * 2 + 4 * 2048 * 4
