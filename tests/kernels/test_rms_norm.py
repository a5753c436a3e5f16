"""rms_norm_reference against the formula in float64 and against the transformers modules it replaces."""
import pytest
import torch
from adapter_doctor.kernels.rms_norm import rms_norm, rms_norm_reference
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

SHAPE = (3, 13, 67)  # odd batch, sequence and hidden sizes


def formula(x, w, eps, offset=0.0):
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + offset)


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(SHAPE[-1], generator=g)).to(dtype).requires_grad_()
    return x, w


@pytest.mark.parametrize("offset,scale_in_fp32", [(0.0, False), (1.0, True), (1.0, False)])
def test_fp32_forward_and_backward_match_the_formula(offset, scale_in_fp32):
    x, w = inputs()
    y = rms_norm_reference(x, w, 1e-6, offset, scale_in_fp32)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = formula(x64, w64, 1e-6, offset)
    torch.testing.assert_close(y.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    y.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)


# (library class, eps, our options, stored weight shift): Gemma stores w - 1 and scales in fp32.
NORMS = {"llama": (LlamaRMSNorm, 1e-5, {}, 0.0),
         "gemma": (GemmaRMSNorm, 1e-6, {"offset": 1.0, "scale_in_fp32": True}, -1.0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(NORMS))
def test_matches_the_library_rmsnorm(family, dtype):
    # Same operations in the same order as the library's norm: equal bit for bit, in bf16 too.
    cls, eps, options, shift = NORMS[family]
    x, w = inputs(dtype)
    w = (w.detach() + shift).requires_grad_()
    hf = cls(SHAPE[-1], eps=eps).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
    x2 = x.detach().clone().requires_grad_()
    ours, theirs = rms_norm_reference(x, w, eps, **options), hf(x2)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, hf.weight.grad, rtol=0, atol=0)


def test_bf16_within_rounding_of_the_float64_formula():
    # One bf16 rounding of the normalised value and one of the product: within 2 ulps (2 * 2**-8) relative.
    x, w = inputs(torch.bfloat16)
    y = rms_norm_reference(x, w, 1e-6)
    torch.testing.assert_close(y.double(), formula(x, w, 1e-6).detach(), rtol=2 * 2**-8, atol=1e-2)


def test_dispatch_on_cpu_is_the_reference():
    x, w = inputs()
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), rtol=0, atol=0)
