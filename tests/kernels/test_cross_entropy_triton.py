"""The chunked linear cross-entropy against cross_entropy_reference and transformers' ForCausalLMLoss: loss, dh,
dW for a trained lm_head, dA/dB for a LoRA on it, -100 labels, num_items_in_batch, soft-capping, and that no
buffer of N x V is ever allocated.

Tolerances. fp32: the same logits (one GEMM per chunk instead of one for all rows) and a logsumexp summed in
another order: 1e-5 on the loss, 1e-5 relative on the gradients. bf16: the logits are bf16 as lm_head writes
them on both sides and the softmax is fp32 on both; the gradient w.r.t. the logits is rounded to bf16 before
its GEMM on both sides too, so the difference is the order of those roundings: 1e-3 on the loss, 1e-2 relative
in norm on gradients.
"""
import subprocess
import sys

import pytest
import torch
from adapter_doctor.kernels import TORCH
from adapter_doctor.kernels.cross_entropy import (
    causal_lm_labels,
    cross_entropy_reference,
    linear_cross_entropy,
    linear_cross_entropy_triton,
)
from adapter_doctor.runtime.eligibility import head_parts
from peft import LoraConfig, get_peft_model

N, H, V, R = 38, 24, 1000, 4  # 38 rows in chunks of 16: the last chunk is partial


def problem(device, dtype, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device, dtype)
    weight = (0.3 * torch.randn(vocab, H, generator=g)).to(device, dtype)
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels.to(device)


def lora_factors(device, seed=1, vocab=V):
    g = torch.Generator().manual_seed(seed)
    return (0.3 * torch.randn(R, H, generator=g)).to(device), (0.3 * torch.randn(vocab, R, generator=g)).to(device)


def run(fn, hidden, weight, labels, train_weight=False, lora=None, scale=1.0, **kwargs):
    """(loss, dh, dW or None, dA or None, dB or None) of `scale · loss`."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(train_weight)
    factors = None if lora is None else tuple(t.clone().requires_grad_() for t in lora)
    loss = fn(h, w, labels, lora=None if lora is None else (*factors, 1.5), **kwargs)
    (scale * loss).backward()
    lora_grads = (None, None) if factors is None else tuple(t.grad for t in factors)
    return loss.detach(), h.grad, w.grad, *lora_grads


def assert_matches(ours, ref, loss_tol, grad_tol, rel):
    torch.testing.assert_close(ours[0], ref[0], rtol=loss_tol, atol=loss_tol)
    for a, b in zip(ours[1:], ref[1:]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and rel(a, b) < grad_tol, rel(a, b)


CASES = {
    "frozen-head": {},
    "trained-head": {"train_weight": True},
    "lora-head": {"lora": True},
    "num-items": {"num_items_in_batch": 50},
    "num-items-tensor": {"num_items_in_batch": torch.tensor(41)},
    "softcap": {"softcap": 2.0},
    "scaled-loss": {"scale": 0.25},
}


def case_kwargs(name, device):
    kwargs = dict(CASES[name])
    if kwargs.pop("lora", False):
        kwargs["lora"] = lora_factors(device)
    return kwargs


@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_the_reference(rel, device, poisoned, case):
    hidden, weight, labels = problem(device, torch.float32)
    kwargs = case_kwargs(case, device)
    ours = run(linear_cross_entropy_triton, hidden, weight, labels, chunk_rows=16, **kwargs)
    ref = run(cross_entropy_reference, hidden, weight, labels, **kwargs)
    assert_matches(ours, ref, 1e-5, 1e-5, rel)


@pytest.mark.parametrize("case", ["frozen-head", "trained-head", "lora-head", "softcap"])
def test_bf16_within_rounding(rel, device, poisoned, case):
    hidden, weight, labels = problem(device, torch.bfloat16, seed=2)
    kwargs = case_kwargs(case, device)
    ours = run(linear_cross_entropy_triton, hidden, weight, labels, chunk_rows=16, **kwargs)
    ref = run(cross_entropy_reference, hidden, weight, labels, **kwargs)
    assert_matches(ours, ref, 1e-3, 1e-2, rel)


def test_a_vocabulary_longer_than_one_block(rel, device, poisoned):
    # 8,200 columns: one full block of 8,192 and a partial one, in both passes over the row.
    hidden, weight, labels = problem(device, torch.float32, seed=3, vocab=8200)
    hidden, labels = hidden[:6], labels[:6]
    ours = run(linear_cross_entropy_triton, hidden, weight, labels, chunk_rows=4)
    assert_matches(ours, run(cross_entropy_reference, hidden, weight, labels), 1e-5, 1e-5, rel)


def test_matches_transformers_causal_lm_loss(device):
    # The same shift, mean and num_items_in_batch semantics as ForCausalLMLoss on the full logits.
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight, _ = problem(device, torch.float32)
    hidden = hidden.view(2, 19, H)
    labels = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(4)).to(device)
    labels[0, :7] = -100  # a prompt that is not scored
    for num_items in (None, 30):
        theirs = ForCausalLMLoss(hidden @ weight.T, labels, V, num_items_in_batch=num_items)
        ours = linear_cross_entropy_triton(hidden, weight, causal_lm_labels(labels), num_items_in_batch=num_items,
                                           chunk_rows=16)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:divide by zero")  # the interpreter's numpy computes the unused 1/0
def test_all_labels_ignored_gives_what_torch_gives(device):
    # A mean over no tokens is 0/0 (NaN) in torch too, and no token sends a gradient back.
    hidden, weight, labels = problem(device, torch.float32)
    labels = torch.full_like(labels, -100)
    ours = run(linear_cross_entropy_triton, hidden, weight, labels, chunk_rows=16)
    ref = run(cross_entropy_reference, hidden, weight, labels)
    assert torch.isnan(ours[0]) and torch.isnan(ref[0])
    assert not ours[1].any() and not ref[1].any()
    with_count = linear_cross_entropy_triton(hidden, weight, labels, num_items_in_batch=8)
    assert with_count == 0


def test_no_buffer_of_rows_times_vocabulary(device, poisoned):
    hidden, weight, labels = problem(device, torch.float32)
    run(linear_cross_entropy_triton, hidden, weight, labels, train_weight=True, lora=lora_factors(device),
        chunk_rows=16)
    assert max(torch.Size(s).numel() for s in poisoned) <= 16 * V  # one chunk of logits at most


def test_the_default_chunk_fits_the_budget(device, poisoned, monkeypatch):
    from adapter_doctor.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "LOGITS_BUDGET", 10 * V * 4)  # ten fp32 rows
    hidden, weight, labels = problem(device, torch.float32)
    ours = run(linear_cross_entropy_triton, hidden, weight, labels)
    torch.testing.assert_close(ours[0], run(cross_entropy_reference, hidden, weight, labels)[0])
    assert max(torch.Size(s).numel() for s in poisoned) == 10 * V


def test_forward_only_allocates_no_gradient(device, poisoned):
    hidden, weight, labels = problem(device, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy_triton(hidden.requires_grad_(), weight, labels, chunk_rows=16)
    torch.testing.assert_close(loss, cross_entropy_reference(hidden, weight, labels), rtol=1e-5, atol=1e-5)
    assert (N, H) not in poisoned  # no dh
    assert linear_cross_entropy_triton(hidden.detach(), weight, labels).grad_fn is None


def test_a_second_backward_is_refused(device):
    hidden, weight, labels = problem(device, torch.float32)
    loss = linear_cross_entropy_triton(hidden.requires_grad_(), weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="handed out once"):
        loss.backward()


def test_labels_outside_the_vocabulary_raise(device):
    if device == "cuda":  # a device-side assert ends the CUDA context: see it fail in a process of its own
        code = ("import torch; from adapter_doctor.kernels.cross_entropy import linear_cross_entropy_triton as f\n"
                "h, w = torch.randn(8, 16, device='cuda'), torch.randn(32, 16, device='cuda')\n"
                "labels = torch.zeros(8, dtype=torch.long, device='cuda'); labels[3] = 32\n"
                "f(h, w, labels); torch.cuda.synchronize()")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode != 0 and "outside the vocabulary" in result.stderr
        return
    hidden, weight, labels = problem(device, torch.float32)
    labels[3] = V
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        linear_cross_entropy_triton(hidden, weight, labels)


def test_head_parts_reads_plain_and_lora_heads_and_refuses_what_it_cannot_train():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(H, V, bias=False)

    plain = Head().lm_head
    assert head_parts(plain) == (plain.weight, None)
    model = get_peft_model(Head(), LoraConfig(r=R, lora_alpha=8, target_modules=["lm_head"], lora_dropout=0.0))
    layer = model.base_model.model.lm_head
    weight, (a, b, scaling) = head_parts(layer)
    assert weight is layer.base_layer.weight and a is layer.lora_A["default"].weight and scaling == 2.0
    with pytest.raises(ValueError, match="lora_dropout"):
        head_parts(get_peft_model(Head(), LoraConfig(r=R, target_modules=["lm_head"], lora_dropout=0.1))
                   .base_model.model.lm_head)
    with pytest.raises(ValueError, match="called as a module"):
        head_parts(torch.nn.Linear(H, V))


def test_dispatch_takes_the_reference_off_cuda():
    hidden, weight, labels = problem("cpu", torch.float32)
    assert TORCH.linear_cross_entropy is cross_entropy_reference
    assert torch.equal(linear_cross_entropy(hidden, weight, labels), cross_entropy_reference(hidden, weight, labels))


# ---- GPU, Llama-3.1-8B head (hidden 4096, vocab 128,256, seq 2048 x batch 1 and 4) in bf16 ----------------

def peak_bytes(fn, hidden, weight, labels, lora):
    """Peak CUDA memory above what existed before, for forward and backward of `fn`."""
    h = hidden.clone().requires_grad_()
    factors = None if lora is None else (lora[0].clone().requires_grad_(), lora[1].clone().requires_grad_(), 1.5)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(h, weight, labels, lora=factors).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("head", ["frozen", "lora"])
def test_gpu_llama8b_head_bf16(rel, cuda, batch, head):
    # Numerics: bounds as above (1e-3 on the loss, 1e-2 on gradients). Memory: the reference holds the N x V
    # logits several times over (bf16, their fp32 copy, its log-softmax, their gradients); ours one chunk of
    # LOGITS_BUDGET bytes (all N rows at batch 1), dh [N, H], and for a LoRA head dB [V, r] in fp32.
    from adapter_doctor.kernels.cross_entropy import LOGITS_BUDGET

    n, vocab = batch * 2048, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, 4096, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(vocab, 4096, device="cuda", generator=g) / 64).bfloat16()
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    labels[: n // 8] = -100
    lora = None if head == "frozen" else (torch.randn(16, 4096, device="cuda", generator=g) / 64,
                                          torch.randn(vocab, 16, device="cuda", generator=g) / 4)
    ours = run(linear_cross_entropy_triton, hidden, weight, labels, lora=lora)
    ref = run(cross_entropy_reference, hidden, weight, labels, lora=lora)
    assert_matches(ours, ref, 1e-3, 1e-2, rel)
    del ours, ref
    our_peak = peak_bytes(linear_cross_entropy_triton, hidden, weight, labels, lora)
    ref_peak = peak_bytes(cross_entropy_reference, hidden, weight, labels, lora)
    chunk = min(LOGITS_BUDGET, n * vocab * 2)
    lora_extra = 0 if lora is None else 4 * vocab * 16 * 4  # dB, its fp32 product, B in bf16, B's clone
    assert our_peak < chunk + 2 * hidden.nbytes + lora_extra + (32 << 20), our_peak
    assert our_peak < ref_peak / 4, (our_peak, ref_peak)
    if batch == 4:
        assert our_peak < n * vocab * 4 / 4  # a quarter of one fp32 copy of the logits
