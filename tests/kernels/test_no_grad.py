"""Without grad (a checkpointed layer's first forward) the kernels run without their autograd Functions: the
same values, bit for bit, and nothing recorded. Under Triton's interpreter on CPU, compiled on a GPU."""
import pytest
import torch
from adapter_doctor.kernels import dequant4bit, lora_linear, rms_norm, rope, swiglu
from adapter_doctor.kernels.lora_linear import LoraParts, low_rank

from .test_dequant4bit import IN
from .test_dequant4bit import make_parts as make_4bit_parts


@pytest.fixture
def both(monkeypatch):
    """both(function class, fn, *args): (fn(*args) with grad, the same without grad, when the class's apply
    would raise), detached, as lists."""
    def run(function, fn, *args):
        with_grad = fn(*args)
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(function, "apply", lambda *a: pytest.fail(f"{function.__name__} ran without grad"))
            without = fn(*args)
        return [t.detach() for t in as_list(with_grad)], as_list(without)
    return run


def as_list(result):
    return list(result) if isinstance(result, (list, tuple)) else [result]


def same(pair):
    with_grad, without = pair
    assert len(with_grad) == len(without)
    for a, b in zip(with_grad, without):
        assert b.grad_fn is None and not b.requires_grad
        assert torch.equal(a, b)


def test_lora_projections(device, both):
    g = torch.Generator().manual_seed(1)
    parts = [LoraParts(torch.randn(out, 24, generator=g).to(device), None,
                       torch.randn(4, 24, generator=g).to(device).requires_grad_(),
                       torch.randn(out, 4, generator=g).to(device).requires_grad_(), 0.5) for out in (16, 8)]
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    same(both(lora_linear._lora_function(), lora_linear.lora_multi_linear_fused, x, parts))


def test_4bit_lora_projections(both):
    parts = make_4bit_parts(torch.bfloat16, torch.float32)
    x = torch.randn(2, 3, IN, dtype=torch.bfloat16, requires_grad=True)
    same(both(dequant4bit._lora4bit_function(), dequant4bit.lora4bit_multi_linear_fused, x, parts))


def test_rms_norm(device, both):
    x = torch.randn(4, 6, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    same(both(rms_norm._rms_norm_function(), rms_norm.rms_norm_triton, x, w, 1e-6, 1.0))


@pytest.mark.parametrize("fn", [swiglu.swiglu_triton, swiglu.geglu_triton])
def test_gated_activations(device, both, fn):
    gate = torch.randn(3, 50, device=device, requires_grad=True)
    up = torch.randn(3, 50, device=device, requires_grad=True)
    same(both(swiglu._gated_function(), lambda: fn(gate * 1.0, up[:, :].t().contiguous().t())))  # a strided up is copied on both paths


def test_rope_rotates_in_place_and_marks_the_inputs_changed(device, monkeypatch):
    q0, k0 = torch.randn(2, 4, 6, 8, device=device), torch.randn(2, 2, 6, 8, device=device)
    cos, sin = torch.randn(1, 6, 8, device=device), torch.randn(1, 6, 8, device=device)
    expected = rope.rope_reference(q0, k0, cos, sin)
    q, k = q0.clone(), k0.clone()
    versions = q._version, k._version
    monkeypatch.setattr(rope._rope_function(), "apply", lambda *a: pytest.fail("RoPEFunction ran without grad"))
    with torch.no_grad():
        got = rope.rope_triton(q, k, cos, sin)
    assert got[0] is q and got[1] is k  # rotated in place, as with grad
    assert q._version > versions[0] and k._version > versions[1]  # a saver of the unrotated values fails loudly
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bs_of_one_rank_are_cast_in_one_buffer():
    a_s = [torch.randn(4, 10) for _ in range(3)]
    bs = [torch.randn(out, 4) for out in (6, 2, 5)]
    parts = [LoraParts(None, None, a, b, 1.0) for a, b in zip(a_s, bs)]
    low = low_rank(parts, torch.bfloat16)
    assert torch.equal(low.stacked_a, torch.cat(a_s).bfloat16())
    assert [torch.equal(got, b.bfloat16()) for got, b in zip(low.bs, bs)] == [True] * 3
    assert len({b.untyped_storage().data_ptr() for b in low.bs}) == 1  # blocks of rows of one cast
    mixed = low_rank([parts[0], LoraParts(None, None, torch.randn(3, 10), torch.randn(6, 3), 1.0)], torch.bfloat16)
    assert [b.shape for b in mixed.bs] == [(6, 4), (6, 3)]  # ranks differ: cast one by one
    assert low_rank(parts, torch.float32).bs[1] is bs[1]  # no cast needed: the B's themselves
