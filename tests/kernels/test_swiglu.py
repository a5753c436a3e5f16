"""swiglu_reference and geglu_reference against their formulas and transformers' activations."""
import math

import pytest
import torch
from adapter_doctor.kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference
from transformers.activations import ACT2FN

SHAPE = (3, 11, 37)


def pair(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (3 * torch.randn(SHAPE, generator=g)).to(dtype).requires_grad_(), \
        torch.randn(SHAPE, generator=g).to(dtype).requires_grad_()


def grads(fn, gate, up):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fn(gate, up)
    out.backward(torch.ones_like(out))
    return out, gate.grad, up.grad


FORMULAS = {
    "swiglu": (swiglu_reference, lambda g, u: g * torch.sigmoid(g) * u, "silu"),
    "geglu_tanh": (geglu_reference,
                   lambda g, u: 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u,
                   "gelu_pytorch_tanh"),
    "geglu_erf": (lambda g, u: geglu_reference(g, u, approximate="none"),
                  lambda g, u: 0.5 * g * (1 + torch.erf(g / math.sqrt(2))) * u, "gelu"),
}


@pytest.mark.parametrize("name", FORMULAS)
def test_fp32_forward_and_backward_match_the_formula_in_float64(name):
    ours, formula, _ = FORMULAS[name]
    gate, up = pair()
    out, dg, du = grads(ours, gate, up)
    out64, dg64, du64 = grads(formula, gate.double(), up.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)  # fp32 gelu is vectorised
    torch.testing.assert_close(dg.double(), dg64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(du.double(), du64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FORMULAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_transformers_mlp_expression(name, dtype):
    ours, _, act = FORMULAS[name]
    act_fn = ACT2FN[act]
    gate, up = pair(dtype)
    for a, b in zip(grads(ours, gate, up), grads(lambda g, u: act_fn(g) * u, gate, up)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", FORMULAS)
def test_bf16_within_rounding_of_float64(name):
    ours, formula, _ = FORMULAS[name]
    gate, up = pair(torch.bfloat16)
    torch.testing.assert_close(ours(gate, up).double(), formula(gate.double(), up.double()), rtol=3 * 2**-8, atol=1e-2)


def test_dispatch_on_cpu_is_the_reference():
    gate, up = pair()
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=0, atol=0)
    torch.testing.assert_close(geglu(gate, up), geglu_reference(gate, up), rtol=0, atol=0)
