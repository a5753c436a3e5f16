"""The fused LoRA Function (lora_multi_linear_fused) against the reference and against PEFT's own layers:
several projections sharing one input (q/k/v, gate/up), what is saved, frozen and trainable base weights.

The Function is cuBLAS GEMMs only (no Triton kernel), so these tests run on CPU tensors directly.

Tolerances. fp32: the same products summed in another order (the A's stacked into one GEMM, dX accumulated
in one buffer): 1e-5. bf16: the low-rank term is computed from bf16 operands where PEFT, with fp32 adapters,
upcasts x; and the adapter gradients are rounded to bf16 before their fp32 cast on CPU. Each is one bf16
rounding of O(1) terms: 1e-2 relative in norm for outputs and gradients.
"""
import pytest
import torch
from adapter_doctor.kernels import TORCH, kernel_set
from adapter_doctor.kernels.lora_linear import (
    LoraParts,
    lora_linear,
    lora_multi_linear,
    lora_multi_linear_fused,
    lora_multi_linear_reference,
)
from adapter_doctor.runtime.eligibility import lora_parts
from peft import LoraConfig, get_peft_model

IN = 37
PROJECTIONS = [(29, 5, True), (13, 3, False), (13, 4, True)]  # (out, rank, bias): q, k, v of odd sizes


def make_parts(dtype=torch.float32, adapter_dtype=None, train_weight=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i, (out, rank, bias) in enumerate(PROJECTIONS):
        w = torch.randn(out, IN, generator=g).to(dtype).requires_grad_(train_weight)
        b = torch.randn(out, generator=g).to(dtype) if bias else None
        a = (0.3 * torch.randn(rank, IN, generator=g)).to(adapter_dtype or dtype).requires_grad_()
        bb = (0.3 * torch.randn(out, rank, generator=g)).to(adapter_dtype or dtype).requires_grad_()
        parts.append(LoraParts(w, b, a, bb, 0.5 + i))
    return parts


def trainable(parts):
    return [t for p in parts for t in (p.weight, p.bias, p.lora_a, p.lora_b) if t is not None and t.requires_grad]


def run(fn, x, parts, used=None):
    """(outputs, dx, grads of every trainable tensor) for a random weighting of the outputs in `used`."""
    x = x.clone().requires_grad_()
    for t in trainable(parts):
        t.grad = None
    ys = fn(x, parts)
    g = torch.Generator().manual_seed(9)
    used = range(len(ys)) if used is None else used
    sum((ys[i].float() * torch.randn(ys[i].shape, generator=g).to(ys[i].device)).sum() for i in used).backward()
    return [y.detach() for y in ys], x.grad, [t.grad.clone() for t in trainable(parts)]


def compare(ours, ref, check):
    for a, b in zip(ours[0] + [ours[1]] + ours[2], ref[0] + [ref[1]] + ref[2]):
        check(a, b)


def test_fp32_several_projections_match_the_reference():
    parts, x = make_parts(), torch.randn(3, 7, IN)
    compare(run(lora_multi_linear_fused, x, parts), run(lora_multi_linear_reference, x, parts),
            lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_bf16_within_rounding(rel, adapter_dtype):
    parts, x = make_parts(torch.bfloat16, adapter_dtype), torch.randn(3, 7, IN).bfloat16()
    ours, ref = run(lora_multi_linear_fused, x, parts), run(lora_multi_linear_reference, x, parts)
    assert [y.dtype for y in ours[0]] == [torch.bfloat16] * 3
    assert [t.dtype for t in ours[2]] == [adapter_dtype] * 6
    errors = [rel(a, b) for a, b in zip(ours[0] + [ours[1]] + ours[2], ref[0] + [ref[1]] + ref[2])]
    assert max(errors) < 1e-2, errors


def test_an_unused_projection_gets_no_gradient():
    parts, x = make_parts(), torch.randn(3, 7, IN)
    ys = lora_multi_linear_fused(x.clone().requires_grad_(), parts)
    ys[1].sum().backward()
    assert parts[0].lora_a.grad is None and parts[0].lora_b.grad is None  # as PEFT leaves an unused layer
    expected = lora_multi_linear_reference(x, parts[1:2])[0]
    grads = torch.autograd.grad(expected.sum(), [parts[1].lora_a, parts[1].lora_b])
    torch.testing.assert_close(parts[1].lora_a.grad, grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[1].lora_b.grad, grads[1], rtol=1e-5, atol=1e-5)


def test_trainable_base_weight_gets_its_gradient():
    parts, x = make_parts(train_weight=True), torch.randn(3, 7, IN)
    ours, ref = run(lora_multi_linear_fused, x, parts), run(lora_multi_linear_reference, x, parts)
    assert len(ours[2]) == 9
    compare(ours, ref, lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5))


def test_frozen_base_weight_gets_none():
    parts = make_parts()
    x = torch.randn(3, 7, IN, requires_grad=True)
    sum(y.sum() for y in lora_multi_linear_fused(x, parts)).backward()
    assert all(p.weight.grad is None for p in parts) and x.grad is not None


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_x_is_saved_once_for_all_projections(saved_activation_bytes, adapter_dtype):
    # Saved: x (shared by q, k and v), x·Aᵀ for the three ranks side by side, and the adapters in x's dtype
    # (the A's stacked, and each B where it needed a cast: parameter-sized, so that the backward does not cast
    # again); the weights themselves are not activations. PEFT's order saves x and x·Aᵀ with bf16 adapters;
    # with fp32 adapters on a bf16 base (PEFT's default) it saves an fp32 copy of x per projection instead
    # (6 times x's bytes for three), which the fused path never makes.
    parts = make_parts(torch.bfloat16, adapter_dtype)
    x = torch.randn(4, 9, IN, dtype=torch.bfloat16, requires_grad=True)
    params = [t for p in parts for t in (p.weight, p.bias, p.lora_a, p.lora_b) if t is not None]
    ours = saved_activation_bytes(lambda: lora_multi_linear_fused(x, parts), *params)
    rows, ranks = 4 * 9, sum(rank for _, rank, _ in PROJECTIONS)
    casts = ranks * IN * 2 + (sum(out * rank for out, rank, _ in PROJECTIONS) * 2
                              if adapter_dtype == torch.float32 else 0)
    assert ours == x.nbytes + rows * ranks * 2 + casts
    reference = saved_activation_bytes(lambda: lora_multi_linear_reference(x, parts), *params)
    activations = ours - casts  # what grows with the tokens
    if adapter_dtype == torch.float32:
        assert reference - activations >= 5 * x.nbytes
    else:
        assert reference == activations


def test_outputs_are_tensors_of_their_own():
    # RoPE rotates q and k in place: the outputs must not be views made inside the Function.
    parts = make_parts()
    ys = lora_multi_linear_fused(torch.randn(3, 7, IN, requires_grad=True), parts)
    assert all(y._base is None for y in ys)
    assert [tuple(y.shape) for y in ys] == [(3, 7, out) for out, _, _ in PROJECTIONS]


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(IN, out, bias=b) for out, _, b in PROJECTIONS)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def test_matches_peft_layers_sharing_one_input():
    torch.manual_seed(0)
    model = get_peft_model(Attention(), LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0,
                                                   target_modules=["q_proj", "k_proj", "v_proj"]))
    layers = [getattr(model.base_model.model, name) for name in ("q_proj", "k_proj", "v_proj")]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.3)
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad]
    x = torch.randn(2, 5, IN)
    results = []
    for fn in (lambda x: model(x), lambda x: lora_multi_linear_fused(x, [lora_parts(m) for m in layers])):
        xx = x.clone().requires_grad_()
        ys = fn(xx)
        sum((y * (i + 1)).sum() for i, y in enumerate(ys)).backward()
        results.append([*ys, xx.grad, *[p.grad.clone() for p in lora_params]])
        model.zero_grad(set_to_none=True)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_sets_expose_the_multi_projection_entry():
    parts, x = make_parts(), torch.randn(3, 7, IN)
    assert TORCH.lora_multi_linear is lora_multi_linear_reference
    for fn in (kernel_set("auto").lora_multi_linear, lora_multi_linear):
        for a, b in zip(fn(x, parts), lora_multi_linear_reference(x, parts)):
            assert torch.equal(a, b)  # on CPU every set runs the reference
    single = lora_linear(x, *parts[0])
    assert torch.equal(single, lora_multi_linear_reference(x, parts[:1])[0])


# ---- GPU, Llama-3.1-8B shapes (q/k/v 4096 -> 4096/1024/1024, gate/up 4096 -> 14336, r=16) in bf16 ------------

def llama_parts(outs, adapter_dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [LoraParts(torch.randn(out, 4096, device="cuda", generator=g).bfloat16() / 64, None,
                      (torch.randn(16, 4096, device="cuda", generator=g) / 64).to(adapter_dtype).requires_grad_(),
                      (torch.randn(out, 16, device="cuda", generator=g) / 4).to(adapter_dtype).requires_grad_(), 2.0)
            for out in outs]


@pytest.mark.gpu
@pytest.mark.parametrize("outs", [(4096, 1024, 1024), (14336, 14336)], ids=["qkv", "gate_up"])
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_gpu_llama8b_shape_bf16(rel, cuda, saved_activation_bytes, outs, adapter_dtype):
    # Bounds: bf16 GEMMs with fp32 accumulation each side, bf16 low-rank operands on ours: 1e-2 in norm.
    parts = llama_parts(outs, adapter_dtype)
    x = torch.randn(4, 2048, 4096, device="cuda").bfloat16()
    ours, ref = run(lora_multi_linear_fused, x, parts), run(lora_multi_linear_reference, x, parts)
    for a, b in zip(ours[0] + [ours[1]] + ours[2], ref[0] + [ref[1]] + ref[2]):
        assert rel(a, b) < 1e-2
    xg = x.clone().requires_grad_()
    params = [t for p in parts for t in (p.weight, p.lora_a, p.lora_b)]
    saved = saved_activation_bytes(lambda: lora_multi_linear_fused(xg, parts), *params)
    # x once, the rank-16 products, and the adapters in bf16 (A's stacked; B's where they were cast)
    casts = 16 * 4096 * 2 * len(outs) + (sum(outs) * 16 * 2 if adapter_dtype == torch.float32 else 0)
    assert saved == x.nbytes + 4 * 2048 * 16 * len(outs) * 2 + casts
