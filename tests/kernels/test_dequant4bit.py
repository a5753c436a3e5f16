"""4-bit dequantization and the 4-bit LoRA Function against the PyTorch reference, on synthetic packed weights.

The reference is checked against the format's definition element by element (high nibble first, blocks over
the flat index, nested absmax), then the Triton kernel (under TRITON_INTERPRET=1 on CPU) against the reference,
bit for bit, and the fused Function against the reference, forward and backward. The code tables are
bitsandbytes' published nf4 and fp4 values, scaled to [-1, 1] as it scales them.

Tolerances. The Function runs every GEMM in the compute dtype where the reference (PEFT's order) runs the
low-rank term in the adapters' dtype: fp32 throughout agrees to 1e-5; bf16 to one bf16 rounding of O(1) terms,
1e-2 relative in norm.
"""
import math

import pytest
import torch
from adapter_doctor.kernels import TORCH, TRITON, dequant4bit
from adapter_doctor.kernels.dequant4bit import (
    Lora4bitParts,
    Packed4bit,
    absmax_reference,
    dequantize_4bit_reference,
    dequantize_4bit_triton,
    lora4bit_multi_linear_fused,
    lora4bit_multi_linear_reference,
    low_rank_in_gemm,
)

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
FP4 = [v / 12 for v in (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
                        -3.0)]
CODES = {"nf4": NF4, "fp4": FP4}


def packed(shape, kind="nf4", blocksize=64, nested=False, nested_blocksize=256, seed=0, storage=torch.uint8):
    """A random 4-bit weight of `shape` in the packed layout (random bytes and scales: every nibble value and
    every scale path occurs)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    data = torch.randint(0, 256, ((n + 1) // 2, 1), generator=g, dtype=torch.uint8)
    if storage != torch.uint8:  # bitsandbytes' quant_storage: the same bytes seen as another dtype
        data = data.reshape(-1).view(storage).unsqueeze(1)
    blocks = -(-n // blocksize)
    code = torch.tensor(CODES[kind])
    if not nested:
        return Packed4bit(data, 0.5 + torch.rand(blocks, generator=g), code, blocksize, tuple(shape))
    nested_blocks = -(-blocks // nested_blocksize)
    return Packed4bit(data, torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8), code, blocksize,
                      tuple(shape), 0.1 + torch.rand(nested_blocks, generator=g),
                      torch.linspace(-1, 1, 256), nested_blocksize, torch.tensor(0.75))


SHAPES = [(3, 5), (7, 9), (13, 37), (33, 64), (1, 129)]  # odd element counts leave a padding nibble


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_reference_follows_the_format_element_by_element(kind, nested):
    w = packed((5, 13), kind, blocksize=8, nested=nested, nested_blocksize=3)
    out = dequantize_4bit_reference(w, torch.float32)
    flat, code = w.data.reshape(-1).tolist(), CODES[kind]
    for i in range(65):
        byte = flat[i // 2]
        nibble = byte >> 4 if i % 2 == 0 else byte & 15
        block = i // 8
        if nested:
            scale = w.nested_code[int(w.absmax[block])].item() * w.nested_absmax[block // 3].item() + 0.75
        else:
            scale = w.absmax[block].item()
        assert out.reshape(-1)[i].item() == pytest.approx(code[nibble] * scale, rel=1e-6), i


def test_nested_absmax_adds_the_offset_back():
    w = packed((4, 64), nested=True, nested_blocksize=2)
    expected = [w.nested_code[int(q)].item() * w.nested_absmax[b // 2].item() + 0.75 for b, q in enumerate(w.absmax)]
    torch.testing.assert_close(absmax_reference(w), torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_dequant_matches_the_reference_exactly(device, shape, kind, nested, dtype):
    w = packed(shape, kind, blocksize=32 if shape[1] < 64 else 64, nested=nested, nested_blocksize=2, seed=3)
    w = Packed4bit(*[t.to(device) if torch.is_tensor(t) else t for t in w])
    got = dequantize_4bit_triton(w, dtype)
    assert got.shape == shape and got.dtype == dtype
    assert torch.equal(got.cpu(), dequantize_4bit_reference(w, dtype).cpu())


@pytest.mark.parametrize("blocksize,nested_blocksize", [(6, 3), (10, 5), (2, 1), (128, 256)])
def test_triton_dequant_at_block_sizes_that_are_not_powers_of_two(device, blocksize, nested_blocksize):
    # The kernel is compiled per block size (a constant divisor): every even size, not only the shifts.
    w = packed((13, 37), blocksize=blocksize, nested=True, nested_blocksize=nested_blocksize, seed=5)
    w = Packed4bit(*[t.to(device) if torch.is_tensor(t) else t for t in w])
    assert torch.equal(dequantize_4bit_triton(w, torch.float32).cpu(), dequantize_4bit_reference(w, torch.float32).cpu())


def test_triton_dequant_writes_into_a_larger_buffer_and_nothing_past_the_weight(device, poisoned):
    w = packed((7, 9), blocksize=32)
    w = Packed4bit(*[t.to(device) if torch.is_tensor(t) else t for t in w])
    buffer = torch.full((100,), 7.0, device=device)
    got = dequantize_4bit_triton(w, torch.float32, buffer)
    assert got.data_ptr() == buffer.data_ptr()
    assert torch.equal(got.cpu(), dequantize_4bit_reference(w, torch.float32).cpu())
    assert torch.all(buffer[63:] == 7.0)  # the padding nibble of the 63-element weight is never stored


@pytest.mark.parametrize("nested", [False, True])
def test_triton_dequant_into_wider_rows_fills_the_weights_columns_and_leaves_the_rest(device, nested):
    # Rows 9 + 4 elements apart: the weight's 63 elements land in the first 9 columns of each row, bit for bit,
    # and the 4 columns after each row (where the low-rank term goes) keep what they held.
    w = packed((7, 9), blocksize=6, nested=nested, nested_blocksize=3, seed=2)
    w = Packed4bit(*[t.to(device) if torch.is_tensor(t) else t for t in w])
    buffer = torch.full((7 * 13 + 5,), 7.0, dtype=torch.bfloat16, device=device)
    got = dequantize_4bit_triton(w, torch.bfloat16, buffer, row_stride=13)
    assert got.shape == (7, 13) and got.data_ptr() == buffer.data_ptr()
    assert torch.equal(got[:, :9].cpu(), dequantize_4bit_reference(w, torch.bfloat16).cpu())
    assert torch.all(got[:, 9:] == 7.0) and torch.all(buffer[7 * 13:] == 7.0)


def test_a_row_stride_shorter_than_the_rows_is_refused():
    with pytest.raises(ValueError, match="row stride 8 is shorter"):
        dequantize_4bit_triton(packed((4, 9), blocksize=6), torch.float32, row_stride=8)


def test_a_16_bit_weight_of_odd_size_in_an_exact_buffer(device):
    # 63 elements, in a buffer of exactly that size: the last byte's padding nibble is never stored
    w = packed((7, 9), blocksize=32)
    w = Packed4bit(*[t.to(device) if torch.is_tensor(t) else t for t in w])
    memory = torch.full((64,), 7.0, dtype=torch.bfloat16, device=device)
    got = dequantize_4bit_triton(w, torch.bfloat16, memory[:63])
    assert torch.equal(got.cpu(), dequantize_4bit_reference(w, torch.bfloat16).cpu())
    assert memory[63].item() == 7.0


def test_other_storage_dtypes_are_read_as_bytes(device):
    w = packed((8, 32), blocksize=32, storage=torch.bfloat16)
    assert w.data.dtype == torch.bfloat16
    w = Packed4bit(*[t.to(device) if torch.is_tensor(t) else t for t in w])
    assert torch.equal(dequantize_4bit_triton(w, torch.float32).cpu(), dequantize_4bit_reference(w, torch.float32).cpu())


def test_an_odd_blocksize_is_refused():
    with pytest.raises(ValueError, match="odd"):
        dequantize_4bit_triton(packed((4, 4), blocksize=5), torch.float32)


IN = 37
PROJECTIONS = [(29, 5, True), (13, 3, False), (13, 4, True)]  # (out, rank, bias) of odd sizes
# Outputs together at least twice as wide as the input, as an MLP's gate and up are: the low-rank term is
# folded into the base GEMM there (low_rank_in_gemm), added by addmm in PROJECTIONS.
WIDE = [(61, 5, True), (53, 3, False), (29, 4, True)]
WIDE_ONE = [(80, 7, False)]  # one projection, its rank columns padded to a multiple of 8 with the input's
LAYOUTS = pytest.mark.parametrize("projections", [PROJECTIONS, WIDE, WIDE_ONE], ids=["addmm", "folded", "one"])


def make_parts(dtype=torch.float32, adapter_dtype=None, kinds=("nf4", "fp4", "nf4"), compute=None,
               projections=PROJECTIONS):
    g = torch.Generator().manual_seed(5)
    parts = []
    for i, ((out, rank, bias), kind) in enumerate(zip(projections, kinds)):
        w = packed((out, IN), kind, blocksize=32, nested=i == 1, nested_blocksize=4, seed=i)
        b = torch.randn(out, generator=g).to(dtype) if bias else None
        a = (0.3 * torch.randn(rank, IN, generator=g)).to(adapter_dtype or dtype).requires_grad_()
        bb = (0.3 * torch.randn(out, rank, generator=g)).to(adapter_dtype or dtype).requires_grad_()
        parts.append(Lora4bitParts(w, b, a, bb, 0.5 + i, compute))
    return parts


def run(fn, x, parts, used=None):
    """(outputs, dx, dA and dB of every projection) for a random weighting of the outputs in `used`."""
    x = x.clone().requires_grad_()
    for p in parts:
        p.lora_a.grad = p.lora_b.grad = None
    ys = fn(x, parts)
    g = torch.Generator().manual_seed(9)
    used = range(len(ys)) if used is None else used
    sum((ys[i].float() * torch.randn(ys[i].shape, generator=g)).sum() for i in used).backward()
    grads = [t.grad for p in parts for t in (p.lora_a, p.lora_b)]
    return [y.detach() for y in ys], x.grad, [None if t is None else t.clone() for t in grads]


def test_the_low_rank_term_is_folded_into_the_gemm_only_for_wide_outputs_in_the_base_dtype():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert low_rank_in_gemm(make_parts(projections=WIDE), fp32, fp32)
    assert low_rank_in_gemm(make_parts(projections=WIDE_ONE), bf16, bf16)
    assert not low_rank_in_gemm(make_parts(), fp32, fp32)
    # an fp32 residual stream before a bf16 base keeps the low-rank term in fp32, so it stays out of the GEMM
    assert not low_rank_in_gemm(make_parts(projections=WIDE), bf16, fp32)


@LAYOUTS
def test_fp32_function_matches_the_reference(projections):
    parts, x = make_parts(projections=projections), torch.randn(3, 7, IN)
    ours, ref = run(lora4bit_multi_linear_fused, x, parts), run(lora4bit_multi_linear_reference, x, parts)
    for a, b in zip(ours[0] + [ours[1]] + ours[2], ref[0] + [ref[1]] + ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@LAYOUTS
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_bf16_function_within_rounding(rel, adapter_dtype, projections):
    parts = make_parts(torch.bfloat16, adapter_dtype, projections=projections)
    x = torch.randn(3, 7, IN).bfloat16()
    ours, ref = run(lora4bit_multi_linear_fused, x, parts), run(lora4bit_multi_linear_reference, x, parts)
    assert [y.dtype for y in ours[0]] == [torch.bfloat16] * len(parts) and ours[1].dtype == torch.bfloat16
    assert [t.dtype for t in ours[2]] == [adapter_dtype] * 2 * len(parts)
    errors = [rel(a, b) for a, b in zip(ours[0] + [ours[1]] + ours[2], ref[0] + [ref[1]] + ref[2])]
    assert max(errors) < 1e-2, errors


@LAYOUTS
def test_an_fp32_input_runs_the_base_in_the_compute_dtype_and_the_adapter_in_fp32(rel, projections):
    # prepare_model_for_kbit_training leaves fp32 hidden states before a bf16-compute 4-bit base: the base GEMM
    # runs in bf16 as Linear4bit runs it, the low-rank term in fp32 as PEFT runs it, so only the order of sums
    # differs from the reference (and a wide group does not fold)
    parts = make_parts(torch.bfloat16, torch.float32, compute=torch.bfloat16, projections=projections)
    x = torch.randn(3, 7, IN)
    ours, ref = run(lora4bit_multi_linear_fused, x, parts), run(lora4bit_multi_linear_reference, x, parts)
    assert [y.dtype for y in ours[0]] == [torch.float32] * len(parts) and ours[1].dtype == torch.float32
    errors = [rel(a, b) for a, b in zip(ours[0] + [ours[1]] + ours[2], ref[0] + [ref[1]] + ref[2])]
    assert max(errors) < 1e-4, errors


@LAYOUTS
def test_the_function_through_the_kernel_folds_wide_groups_and_matches_the_reference(device, poisoned, monkeypatch,
                                                                                   rel, projections):
    # The Function as it runs on the GPU: the Triton dequantization (under the interpreter on CPU), every
    # fresh buffer NaN-filled, so that a column of the folded weight or input left unwritten would show. The
    # fold is taken exactly where low_rank_in_gemm says, with its width padded to a multiple of 8.
    if device == "cpu":
        monkeypatch.setattr(dequant4bit, "on_triton", lambda *tensors: True)
    strides = []
    kernel = dequant4bit.dequantize_4bit_triton
    monkeypatch.setattr(dequant4bit, "dequantize_4bit_triton",
                        lambda w, dtype, out=None, row_stride=None: strides.append(row_stride) or
                        kernel(w, dtype, out, row_stride))
    parts = [Lora4bitParts(Packed4bit(*[t.to(device) if torch.is_tensor(t) else t for t in p.weight]),
                           None if p.bias is None else p.bias.to(device),
                           p.lora_a.detach().to(device).requires_grad_(), p.lora_b.detach().to(device).requires_grad_(),
                           p.scaling) for p in make_parts(projections=projections)]
    g = torch.Generator().manual_seed(9)
    x = torch.randn((3, 7, IN), generator=g).to(device)
    weights = [torch.randn((3, 7, out), generator=g).to(device) for out, _, _ in projections]

    def outputs_and_grads(fn):
        xs = x.clone().requires_grad_()
        ys = fn(xs, parts)
        for p in parts:
            p.lora_a.grad = p.lora_b.grad = None
        sum((y * w).sum() for y, w in zip(ys, weights)).backward()
        return [y.detach() for y in ys] + [xs.grad] + [t.grad for p in parts for t in (p.lora_a, p.lora_b)]

    ours = outputs_and_grads(lora4bit_multi_linear_fused)
    ranks = sum(rank for _, rank, _ in projections)
    folded = low_rank_in_gemm(parts, torch.float32, torch.float32)
    forward = strides[:len(parts)]  # then the backward's, contiguous
    assert forward == ([-(-(IN + ranks) // 8) * 8] * len(parts) if folded else [None] * len(parts))
    assert strides[len(parts):] == [None] * len(parts)
    # fp32 in another order of sums (the low-rank term inside the GEMM's reduction): to 1e-5 in norm
    errors = [rel(a, b) for a, b in zip(ours, outputs_and_grads(lora4bit_multi_linear_reference))]
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("projections", [PROJECTIONS, WIDE], ids=["addmm", "folded"])
def test_an_unused_projection_gets_no_gradient_and_the_others_match(projections):
    parts, x = make_parts(projections=projections), torch.randn(3, 7, IN)
    ours, ref = run(lora4bit_multi_linear_fused, x, parts, [0, 2]), run(lora4bit_multi_linear_reference, x, parts,
                                                                        [0, 2])
    assert ours[2][2] is None and ours[2][3] is None
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-5)
    for i in (0, 2):
        torch.testing.assert_close(ours[0][i], ref[0][i], rtol=1e-5, atol=1e-5)


@LAYOUTS
def test_gradient_only_placeholders_give_the_full_backward(projections):
    parts, x = make_parts(projections=projections), torch.randn(3, 7, IN)
    full = run(lora4bit_multi_linear_fused, x, parts)
    placeholders = run(lambda x, p: lora4bit_multi_linear_fused(x, p, values=False), x, parts)
    assert all(y.stride()[-1] == 0 for y in placeholders[0])
    for a, b in zip([placeholders[1]] + placeholders[2], [full[1]] + full[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@LAYOUTS
def test_no_dequantized_weight_is_saved_for_backward(saved_activation_bytes, projections):
    parts, x = make_parts(projections=projections), torch.randn(3, 7, IN, requires_grad=True)
    params = [t for p in parts for t in (p.bias, p.lora_a, p.lora_b) if t is not None]
    saved = saved_activation_bytes(lambda: lora4bit_multi_linear_fused(x, parts), x, *params)
    ranks = sum(p.lora_a.shape[0] for p in parts)
    # x·Aᵀ, and the A's stacked (parameter-sized, so that the backward does not stack them again; a lone A is
    # saved as itself); x is the input, the weights stay packed, and the fp32 B's are saved as themselves.
    assert saved == 3 * 7 * ranks * 4 + (ranks * IN * 4 if len(parts) > 1 else 0)


def test_kernel_sets_serve_the_4bit_path():
    parts, x = make_parts(), torch.randn(2, 3, IN)
    for kernels in (TORCH, TRITON):
        ys = kernels.lora4bit_multi_linear(x, parts)
        for y, ref in zip(ys, lora4bit_multi_linear_reference(x, parts)):
            torch.testing.assert_close(y, ref)
