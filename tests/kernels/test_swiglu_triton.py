"""The Triton SwiGLU / GeGLU against their references: forward, d(gate) and d(up), what is saved, and the
in-place backward into gate's and up's buffers (only for intermediate results, loudly refused afterwards).

Tolerances. fp32: the same formulas in fp32 (tanh and the sigmoid written through exp, erf from the math
library): 1e-5. bf16: the kernel rounds act(g)·u once from fp32 where the reference rounds act(g) and then
the product, so an element may differ by 1.5 ulps (2·2^-7 relative with the margin); gradients 1e-2 in norm.
"""
import pytest
import torch
from adapter_doctor.kernels.swiglu import geglu, geglu_reference, geglu_triton, swiglu, swiglu_reference, swiglu_triton

BF16_ULP = 2.0**-7
IN, OUT = 16, 37  # 3 x 11 x 37 = 1221 elements: one full block of 1024 and a partial one
KINDS = {
    "swiglu": (swiglu_triton, swiglu_reference),
    "geglu_tanh": (lambda g, u, **kw: geglu_triton(g, u, "tanh", **kw), lambda g, u: geglu_reference(g, u, "tanh")),
    "geglu_erf": (lambda g, u, **kw: geglu_triton(g, u, "none", **kw), lambda g, u: geglu_reference(g, u, "none")),
}


def weights(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 11, IN, generator=g)
    wg, wu = 0.8 * torch.randn(OUT, IN, generator=g), torch.randn(OUT, IN, generator=g)
    dy = torch.randn(3, 11, OUT, generator=g)
    return x.to(device, dtype), wg.to(device, dtype), wu.to(device, dtype), dy.to(device, dtype)


def run(fn, x, wg, wu, dy):
    """(y, dx, gate buffer after backward, up buffer after backward) with gate and up from projections."""
    x = x.clone().requires_grad_()
    gate, up = x @ wg.T, x @ wu.T
    y = fn(gate, up)
    y.backward(dy)
    return y.detach(), x.grad, gate.detach(), up.detach()


def reference_grads(ref, x, wg, wu, dy):
    gate, up = (x @ wg.T).requires_grad_(), (x @ wu.T).requires_grad_()
    ref(gate, up).backward(dy)
    return gate.grad, up.grad


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_matches_the_reference(device, poisoned, kind):
    ours, ref = KINDS[kind]
    x, wg, wu, dy = weights(device, torch.float32)
    (y, dx, *_), (y_ref, dx_ref, *_) = run(ours, x, wg, wu, dy), run(ref, x, wg, wu, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_within_rounding(rel, device, poisoned, kind):
    ours, ref = KINDS[kind]
    x, wg, wu, dy = weights(device, torch.bfloat16, seed=1)
    (y, dx, *_), (y_ref, dx_ref, *_) = run(ours, x, wg, wu, dy), run(ref, x, wg, wu, dy)
    torch.testing.assert_close(y, y_ref, rtol=2 * BF16_ULP, atol=1e-3)
    assert rel(y, y_ref) < 1e-2 and rel(dx, dx_ref) < 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_backward_writes_the_gradients_into_gate_and_up(device, kind):
    # gate and up are the projections' outputs, read by nothing after this backward: their buffers now hold
    # d(gate) and d(up).
    ours, ref = KINDS[kind]
    x, wg, wu, dy = weights(device, torch.float32)
    _, _, gate_after, up_after = run(ours, x, wg, wu, dy)
    d_gate, d_up = reference_grads(ref, x, wg, wu, dy)
    torch.testing.assert_close(gate_after, d_gate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up_after, d_up, rtol=1e-5, atol=1e-5)


def test_out_of_place_when_asked(device):
    x, wg, wu, dy = weights(device, torch.float32)
    _, dx, gate_after, _ = run(lambda g, u: swiglu_triton(g, u, in_place=False), x, wg, wu, dy)
    torch.testing.assert_close(gate_after, x @ wg.T)
    torch.testing.assert_close(dx, run(swiglu_reference, x, wg, wu, dy)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_leaves_are_never_overwritten(device, kind):
    ours, ref = KINDS[kind]
    x, wg, wu, dy = weights(device, torch.float32)
    gate, up = (x @ wg.T).requires_grad_(), (x @ wu.T).requires_grad_()
    gate0, up0 = gate.detach().clone(), up.detach().clone()
    ours(gate, up).backward(dy)
    assert torch.equal(gate.detach(), gate0) and torch.equal(up.detach(), up0)
    d_gate, d_up = reference_grads(ref, x, wg, wu, dy)
    torch.testing.assert_close(gate.grad, d_gate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up.grad, d_up, rtol=1e-5, atol=1e-5)


def test_views_of_one_fused_projection_are_copied_not_overwritten(device):
    # A fused gate_up projection chunked along the last dimension: neither half is contiguous.
    x, wg, wu, dy = weights(device, torch.float32)
    xx = x.clone().requires_grad_()
    fused = xx @ torch.cat([wg, wu]).T
    fused0 = fused.detach().clone()
    gate, up = fused.chunk(2, dim=-1)
    swiglu_triton(gate, up).backward(dy)
    assert torch.equal(fused.detach(), fused0)
    torch.testing.assert_close(xx.grad, run(swiglu_reference, x, wg, wu, dy)[1], rtol=1e-5, atol=1e-5)


def test_a_second_backward_fails_loudly(device):
    x, wg, wu, dy = weights(device, torch.float32)
    xx = x.clone().requires_grad_()
    y = swiglu_triton(xx @ wg.T, xx @ wu.T)
    y.backward(dy, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


def test_another_saver_of_gate_reads_it_first_or_fails_loudly(device):
    # Autograd runs the later node first. A saver created after the activation reads gate before it is
    # overwritten; one created before would read it after, and the version bump makes that an error.
    x, wg, wu, dy = weights(device, torch.float32)
    xx = x.clone().requires_grad_()
    gate, up = xx @ wg.T, xx @ wu.T
    y = swiglu_triton(gate, up)
    (y * dy).sum().add((gate * gate).sum()).backward()
    xr = x.clone().requires_grad_()
    gate_r, up_r = xr @ wg.T, xr @ wu.T
    (swiglu_reference(gate_r, up_r) * dy).sum().add((gate_r * gate_r).sum()).backward()
    torch.testing.assert_close(xx.grad, xr.grad, rtol=1e-5, atol=1e-5)

    gate, up = xx @ wg.T, xx @ wu.T
    squared = gate * gate
    y = swiglu_triton(gate, up)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y * dy).sum().add(squared.sum()).backward()


def test_saves_gate_and_up_only(device, saved_activation_bytes):
    x, wg, wu, _ = weights(device, torch.bfloat16)
    xx = x.clone().requires_grad_()
    gate, up = xx @ wg.T, xx @ wu.T
    ours = saved_activation_bytes(lambda: swiglu_triton(gate, up))
    assert ours == gate.nbytes + up.nbytes
    assert ours < saved_activation_bytes(lambda: swiglu_reference(gate, up))


def test_extreme_gates_stay_finite(device):
    g = torch.tensor([-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0], device=device).repeat(3)
    u = torch.ones_like(g)
    for kind, (ours, ref) in KINDS.items():
        gate, up = g.clone().requires_grad_(), u.clone().requires_grad_()
        y = ours(gate, up)
        y.backward(torch.ones_like(y))
        gate_ref, up_ref = g.clone().requires_grad_(), u.clone().requires_grad_()
        ref(gate_ref, up_ref).backward(torch.ones_like(y))
        torch.testing.assert_close(y, ref(g, u), rtol=1e-5, atol=1e-5, msg=kind)
        torch.testing.assert_close(gate.grad, gate_ref.grad, rtol=1e-5, atol=1e-5, msg=kind)


def test_dispatch_takes_the_reference_off_cuda():
    x, wg, wu, _ = weights("cpu", torch.float32)
    gate, up = x @ wg.T, x @ wu.T
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
    assert torch.equal(geglu(gate, up, "none"), geglu_reference(gate, up, "none"))


# ---- GPU, Llama-3.1-8B shapes (intermediate 14336, batch 4 x seq 2048) in bf16 -----------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_llama8b_shape_bf16(rel, cuda, kind):
    # Bounds: one rounding against two (y), fp32 against bf16 intermediates (gradients): 1e-2 in norm.
    ours, ref = KINDS[kind]
    g = torch.Generator(device="cuda").manual_seed(0)
    gate0 = torch.randn(4, 2048, 14336, device="cuda", generator=g).bfloat16()
    up0 = torch.randn(4, 2048, 14336, device="cuda", generator=g).bfloat16()
    dy = torch.randn(4, 2048, 14336, device="cuda", generator=g).bfloat16()
    gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    y_ref = ref(gate, up)
    y_ref.backward(dy)
    base = gate0.clone().requires_grad_()
    pair = base * 1, up0 * 1  # intermediates, so that backward takes the in-place path
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = ours(*pair)
    assert torch.cuda.max_memory_allocated() - before <= y.nbytes  # nothing but the output
    y.backward(dy)
    assert rel(y, y_ref) < 1e-2
    assert rel(base.grad, gate.grad) < 1e-2
