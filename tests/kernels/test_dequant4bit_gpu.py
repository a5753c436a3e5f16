"""The 4-bit path against the real bitsandbytes on a CUDA device: its dequantize_4bit, its Linear4bit matmul
inside PEFT's LoRA layer, and a QLoRA model (loaded with BitsAndBytesConfig, prepared with
prepare_model_for_kbit_training) trained by HF+PEFT and by the patched runtime from the same seed.

Tolerances. Dequantization: bit-exact without double quantization; with it, the absmax is rebuilt as
code·scale + offset, which the compiler may fuse into one rounding where bitsandbytes rounds twice, so a few
elements per million may differ by one bf16 step. The LoRA layer: bf16 GEMMs in another order, 1e-2 relative
in norm. The model: loss within 1e-3, LoRA gradients within 1% (relative in norm, per tensor), the loss curves
within 1% per step.
"""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (../shared/device/unsloth-wheels.sh bnb)")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def quantized(bnb, shape, quant_type, nested, blocksize=64, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02
    data, state = bnb.functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested,
                                               quant_type=quant_type)
    return data, state


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((4096, 4096), 64), ((1024, 14336), 64), ((333, 777), 128),
                                             ((129, 65), 32)])
def test_dequant_matches_bitsandbytes(bnb, quant_type, nested, shape, blocksize):
    from adapter_doctor.kernels.dequant4bit import dequantize_4bit_triton
    from adapter_doctor.runtime.eligibility import packed_4bit

    data, state = quantized(bnb, shape, quant_type, nested, blocksize)
    expected = bnb.functional.dequantize_4bit(data, state)
    got = dequantize_4bit_triton(packed_4bit(types.SimpleNamespace(data=data, quant_state=state)), torch.bfloat16)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if not nested:
        assert torch.equal(got, expected)
    else:
        differ = (got != expected).float().mean().item()
        assert differ < 1e-4, differ
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)


def lora_layer(bnb, quant_type, nested, bias, out=1536, inp=1024):
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dense = nn.Linear(inp, out, bias=bias, dtype=torch.bfloat16)
    base = bnb.nn.Linear4bit(inp, out, bias=bias, compute_dtype=torch.bfloat16, compress_statistics=nested,
                             quant_type=quant_type)
    base.load_state_dict(dense.state_dict())
    holder = nn.Module()
    holder.proj = base.cuda()
    model = get_peft_model(holder, LoraConfig(r=16, lora_alpha=32, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer


@pytest.mark.parametrize("quant_type,nested,bias", [("nf4", True, False), ("nf4", False, True), ("fp4", True, False)])
def test_fused_layer_matches_peft_on_bitsandbytes(bnb, quant_type, nested, bias):
    from adapter_doctor.kernels import Lora4bitParts
    from adapter_doctor.kernels.dequant4bit import lora4bit_multi_linear_fused
    from adapter_doctor.runtime.eligibility import lora_parts, why_not_fused

    layer = lora_layer(bnb, quant_type, nested, bias)
    assert why_not_fused(layer) is None
    parts = lora_parts(layer)
    assert isinstance(parts, Lora4bitParts) and parts.compute_dtype == torch.bfloat16
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(4, 512, 1536, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(dy)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        grads = [xi.grad, a.grad.clone(), b.grad.clone()]
        a.grad = b.grad = None
        return [y.detach(), *grads]

    ref = run(layer)
    ours = run(lambda xi: lora4bit_multi_linear_fused(xi, [parts])[0])
    errors = [rel(o, r) for o, r in zip(ours, ref)]
    assert max(errors) < 1e-2, errors
    # The base matmul alone: bitsandbytes' matmul_4bit and ours on the same dequantized weight
    base = layer.base_layer
    expected = bnb.matmul_4bit(x, base.weight.t(), bias=base.bias, quant_state=base.weight.quant_state)
    zero_b = parts._replace(lora_b=torch.zeros_like(parts.lora_b))
    assert rel(lora4bit_multi_linear_fused(x, [zero_b])[0], expected) < 1e-3


SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qlora-small")
    LlamaForCausalLM(LlamaConfig(**SMALL)).to(torch.bfloat16).save_pretrained(path)
    return path


def qlora(path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16,
                                             device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.config.use_cache = False
    return model.train()  # from_pretrained leaves eval mode, where transformers skips checkpointing


def counting_triton(calls):
    from adapter_doctor.kernels import TRITON

    def count(x, parts_list):
        calls.extend(parts_list)
        return TRITON.lora4bit_multi_linear(x, parts_list)

    return dataclasses.replace(TRITON, lora4bit_multi_linear=count)


def one_step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_qlora_model_step_matches_hf_peft(bnb, checkpoint):
    from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched

    model = qlora(checkpoint)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 256), device="cuda", generator=None)
    loss, grads = one_step(model, ids)
    calls: list = []
    report = ensure_patched(model, kernels=counting_triton(calls))
    assert not report.failures and not report.fallbacks
    ours_loss, ours_grads = one_step(model, ids)
    assert len(calls) in (7 * SMALL["num_hidden_layers"], 14 * SMALL["num_hidden_layers"])  # replays count
    assert abs(ours_loss - loss) <= 1e-3 * abs(loss)
    assert set(ours_grads) == set(grads) and len(grads) == 2 * 7 * SMALL["num_hidden_layers"]
    errors = {n: rel(ours_grads[n], grads[n]) for n in grads}
    assert max(errors.values()) < 1e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    enable_offloaded_checkpointing(model)
    off_loss, off_grads = one_step(model, ids)
    assert abs(off_loss - loss) <= 1e-3 * abs(loss)
    assert max(rel(off_grads[n], grads[n]) for n in grads) < 1e-2


def curve(model, steps=40):
    torch.manual_seed(3)
    ids = torch.randint(0, SMALL["vocab_size"], (4, 128), device="cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_qlora_convergence_matches_hf_peft(bnb, checkpoint):
    from adapter_doctor.runtime import ensure_patched

    expected = curve(qlora(checkpoint))
    model = qlora(checkpoint)
    ensure_patched(model, kernels="triton")
    got = curve(model)
    assert expected[-1] < 0.8 * expected[0]  # it learns: the curve means something
    worst = max(abs(g - e) / e for g, e in zip(got[5:], expected[5:]))
    assert worst < 1e-2, (worst, got, expected)


def test_qlora_offloaded_layers_replayed_as_cuda_graphs_train_as_eager_ones(bnb, checkpoint):
    from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched, host_plan

    runs = {}
    for graphs in (False, True):
        model = qlora(checkpoint)
        ensure_patched(model, kernels="triton")
        enable_offloaded_checkpointing(model, cuda_graphs=graphs)
        runs[graphs] = curve(model, steps=6), host_plan(model).graphs
    (eager, _), (graphed, stats) = runs[False], runs[True]
    layers = SMALL["num_hidden_layers"]
    assert stats.captured == 2 * layers and stats.replayed == 2 * layers * 5, stats
    assert max(abs(g - e) / e for g, e in zip(graphed, eager)) <= 1e-6, (graphed, eager)
