"""The runtime's 4-bit path on a tiny Llama whose projections are 4-bit, without bitsandbytes (CPU CI).

STAND-IN, not bitsandbytes: `StandInLinear4bit` is built from bitsandbytes 0.50.2's source structure
(`nn.Linear4bit.forward`: x cast to `compute_dtype`, the bias cast, the weight dequantized to the input's dtype,
the output cast back; `Params4bit.quant_state`, a `QuantState` with absmax, shape, code, blocksize, quant_type,
offset and state2; quantization as its default backend's `quantize_4bit`: per-block absmax, nearest code
value, the even element in the high nibble). PEFT wraps it in its own `lora.Linear`, whose forward computes
what PEFT's bnb `Linear4bit` layer does. The runtime recognises a 4-bit base by bitsandbytes' class, which the
tests point at the stand-in class. The same path on the real bitsandbytes runs on the device
(tests/kernels/test_dequant4bit_gpu.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from adapter_doctor.kernels import TORCH
from adapter_doctor.runtime import eligibility, enable_offloaded_checkpointing, ensure_patched

from .test_dequant4bit import FP4, NF4

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StandInQuantState:
    """The fields of bitsandbytes' QuantState that a Linear4bit reads."""

    def __init__(self, absmax, shape, code, blocksize, quant_type, dtype, offset=None, state2=None):
        self.absmax, self.shape, self.code, self.blocksize = absmax, shape, code, blocksize
        self.quant_type, self.dtype, self.offset, self.state2 = quant_type, dtype, offset, state2
        self.nested = state2 is not None


def stand_in_quantize(weight: torch.Tensor, quant_type: str, blocksize: int, nested: bool):
    """(packed [(n + 1) // 2, 1] uint8, StandInQuantState), the way bitsandbytes' default backend quantizes."""
    code = torch.tensor(NF4 if quant_type == "nf4" else FP4)
    flat = weight.detach().float().reshape(-1)
    n = flat.numel()
    pad = -n % blocksize
    blocks = F.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(1).clamp_min(1e-12)
    scaled = (blocks / absmax[:, None]).reshape(-1)[:n]
    q = (scaled[:, None] - code[None, :]).abs().argmin(1).to(torch.uint8)
    q = F.pad(q, (0, n % 2))
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    if not nested:
        return packed, StandInQuantState(absmax, weight.shape, code, blocksize, quant_type, weight.dtype)
    offset = absmax.mean()
    centred = absmax - offset
    inner_code = torch.linspace(-1, 1, 256)  # a sorted 256-value table, as bitsandbytes' dynamic map is
    inner_blocks = F.pad(centred, (0, -centred.numel() % 256)).view(-1, 256)
    inner_absmax = inner_blocks.abs().amax(1).clamp_min(1e-12)
    inner = (inner_blocks / inner_absmax[:, None]).reshape(-1)[:centred.numel()]
    qabsmax = (inner[:, None] - inner_code[None, :]).abs().argmin(1).to(torch.uint8)
    state2 = StandInQuantState(inner_absmax, None, inner_code, 256, None, torch.float32)
    return packed, StandInQuantState(qabsmax, weight.shape, code, blocksize, quant_type, weight.dtype, offset,
                                     state2)


def stand_in_dequantize(packed: torch.Tensor, state: StandInQuantState, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' default-backend dequantization: nibbles high then low, code lookup, per-block scale."""
    flat = packed.reshape(-1)
    q = torch.empty(flat.numel() * 2, dtype=torch.long)
    q[::2], q[1::2] = (flat >> 4).long(), (flat & 15).long()
    n = state.shape[0] * state.shape[1]
    absmax = state.absmax
    if state.nested:
        inner = state.state2
        absmax = (inner.code[absmax.long()].view(-1) * inner.absmax.repeat_interleave(256)[:absmax.numel()])
        absmax = absmax + state.offset
    values = state.code[q[:n]] * absmax.repeat_interleave(state.blocksize)[:n]
    return values.reshape(state.shape).to(dtype)


class StandInLinear4bit(torch.nn.Linear):
    """STAND-IN for bitsandbytes.nn.Linear4bit (see the module docstring)."""

    def __init__(self, linear: torch.nn.Linear, quant_type: str, blocksize: int, nested: bool,
                 compute_dtype: torch.dtype | None):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        packed, state = stand_in_quantize(linear.weight, quant_type, blocksize, nested)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.weight.quant_state = state
        if linear.bias is not None:
            self.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.compute_dtype, self.compute_type_is_set = compute_dtype, compute_dtype is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = stand_in_dequantize(self.weight, self.weight.quant_state, x.dtype)
        return F.linear(x, weight, bias).to(inp_dtype)


@pytest.fixture
def stand_in_bnb(monkeypatch):
    monkeypatch.setattr(eligibility, "_bnb_linear4bit", lambda: StandInLinear4bit)


def tiny_4bit(quant_type="nf4", blocksize=64, nested=False, compute_dtype=torch.float32, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in TARGETS:
                    setattr(parent, name, StandInLinear4bit(child, quant_type, blocksize, nested, compute_dtype))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def step(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


IDS = torch.randint(3, 120, (2, 11), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_4bit_projections_take_the_4bit_path_with_equal_numerics(stand_in_bnb, quant_type, nested):
    model = tiny_4bit(quant_type, nested=nested)
    expected = step(model, IDS)
    calls = []

    def counting(x, parts_list):
        calls.extend(parts_list)
        return TORCH.lora4bit_multi_linear(x, parts_list)

    report = ensure_patched(model, kernels=dataclasses.replace(TORCH, lora4bit_multi_linear=counting))
    assert not report.failures and not report.fallbacks
    taken = f"fused 4-bit {quant_type}" + (", double-quantized" if nested else "")
    assert [(p.path_taken, p.reason) for p in report.projections] == [(taken, "")] * 2 * 7
    assert report.projections[0].path.endswith("layers.0.self_attn.q_proj")
    got = step(model, IDS)
    assert len(calls) == 2 * 7 and {p.weight.data.dtype for p in calls} == {torch.uint8}
    assert rel(got[0], expected[0]) <= 1e-5
    assert set(got[1]) == set(expected[1]) and len(got[1]) == 2 * 7 * 2
    assert max(rel(got[1][n], expected[1][n]) for n in expected[1]) <= 1e-4


def test_an_unreadable_layout_falls_back_per_module_and_is_reported(stand_in_bnb):
    model = tiny_4bit()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    q_proj.base_layer.weight.quant_state.quant_type = "int4"  # a code this path does not read
    expected = step(model, IDS)
    report = ensure_patched(model, kernels="torch")
    assert [(f.path.rsplit(".", 3)[-3:], f.reason) for f in report.fallbacks] == \
        [(["0", "self_attn", "q_proj"], "4-bit quant_type 'int4'")]
    taken = [p.path_taken for p in report.projections]
    assert taken[0] == "fallback" and taken[1:] == ["fused 4-bit nf4"] * 13
    got = step(model, IDS)
    assert rel(got[0], expected[0]) <= 1e-5
    assert max(rel(got[1][n], expected[1][n]) for n in expected[1]) <= 1e-4


def test_without_bitsandbytes_a_4bit_base_is_a_reported_fallback():
    # The real bitsandbytes class is not the stand-in: the layers are projections whose base is unknown.
    model = tiny_4bit()
    report = ensure_patched(model, kernels="torch")
    assert len(report.fallbacks) == 2 * 7
    assert {f.reason for f in report.fallbacks} == {"base layer is StandInLinear4bit"}
    assert {(p.path_taken, p.reason) for p in report.projections} == {("fallback", "base layer is StandInLinear4bit")}


def test_bf16_compute_on_an_fp32_stream(stand_in_bnb):
    model = tiny_4bit(compute_dtype=torch.bfloat16, nested=True)
    expected = step(model, IDS)
    report = ensure_patched(model, kernels="triton" if torch.cuda.is_available() else "torch")
    assert not report.fallbacks
    got = step(model, IDS)
    assert rel(got[0], expected[0]) <= 1e-5
    assert max(rel(got[1][n], expected[1][n]) for n in expected[1]) <= 1e-4


@pytest.mark.parametrize("chunk_tokens", [None, 5])  # 5: the MLP in chunks of 5 of the 22 rows
def test_offloaded_checkpointing_on_4bit_bases(stand_in_bnb, monkeypatch, chunk_tokens):
    from adapter_doctor.runtime import chunked_mlp

    if chunk_tokens:
        monkeypatch.setattr(chunked_mlp, "CHUNK_TOKENS", chunk_tokens)
    model = tiny_4bit(nested=True)
    expected = step(model, IDS)
    rows = []

    def swiglu(gate, up):
        rows.append(gate.numel() // gate.shape[-1])
        return TORCH.swiglu(gate, up)

    ensure_patched(model, kernels=dataclasses.replace(TORCH, swiglu=swiglu))
    assert enable_offloaded_checkpointing(model) == 2
    got = step(model, IDS)
    assert max(rows) == (chunk_tokens or 22)
    assert rel(got[0], expected[0]) <= 1e-5
    assert max(rel(got[1][n], expected[1][n]) for n in expected[1]) <= 1e-4


def test_dense_projections_are_reported_fused():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=TARGETS[:4]))
    report = ensure_patched(model, kernels="torch")
    assert [(p.path.rsplit(".", 1)[-1], p.path_taken) for p in report.projections] == \
        [(name, "fused") for name in TARGETS[:4]]
