"""rope_reference against the rotation it stands for and against transformers' apply_rotary_pos_emb."""
import pytest
import torch
from adapter_doctor.kernels.rope import rope, rope_reference
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

B, H, KV, S, D = 3, 5, 1, 13, 18  # odd batch, heads and sequence; head_dim must be even


def angles(dtype=torch.float32):
    positions = torch.arange(S).repeat(B, 1) + torch.arange(B)[:, None] * 7
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def qk(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, S, D, generator=g).to(dtype).requires_grad_(),
            torch.randn(B, KV, S, D, generator=g).to(dtype).requires_grad_())


def rotate_pairs(x, cos, sin):
    """Rotate each (i, i + D/2) pair by its angle, written as a complex product in float64."""
    half = D // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    r = torch.complex(cos[..., :half].double(), sin[..., :half].double()).unsqueeze(1)
    out = z * r
    return torch.cat((out.real, out.imag), dim=-1)


def test_fp32_forward_is_a_rotation_of_each_pair():
    q, k = qk()
    cos, sin = angles()
    q2, k2 = rope_reference(q, k, cos, sin)
    torch.testing.assert_close(q2.double(), rotate_pairs(q.detach(), cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2.double(), rotate_pairs(k.detach(), cos, sin), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_transformers(dtype):
    q, k = qk(dtype)
    cos, sin = angles(dtype)
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    ours, theirs = rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q2, k2, cos, sin)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    gq, gk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    torch.autograd.backward(ours, (gq, gk))
    torch.autograd.backward(theirs, (gq, gk))
    torch.testing.assert_close(q.grad, q2.grad, rtol=0, atol=0)
    torch.testing.assert_close(k.grad, k2.grad, rtol=0, atol=0)


def test_backward_is_the_inverse_rotation():
    # The Jacobian of a rotation is the rotation; its transpose rotates back by the same angle.
    q, k = qk()
    cos, sin = angles()
    gq = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    q2, _ = rope_reference(q, k, cos, sin)
    q2.backward(gq)
    torch.testing.assert_close(q.grad.double(), rotate_pairs(gq, cos, -sin), rtol=1e-5, atol=1e-5)


def test_bf16_within_rounding_of_float64():
    q, k = qk(torch.bfloat16)
    cos, sin = angles(torch.bfloat16)
    q2, _ = rope_reference(q, k, cos, sin)
    torch.testing.assert_close(q2.double(), rotate_pairs(q.detach(), cos, sin), rtol=2 * 2**-8, atol=2e-2)


def test_dispatch_on_cpu_is_the_reference():
    q, k = qk()
    cos, sin = angles()
    for a, b in zip(rope(q, k, cos, sin), rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
