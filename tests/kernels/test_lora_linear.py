"""lora_linear_reference against PEFT's lora.Linear and the merged weight; lora_parts' eligibility rules."""
import pytest
import torch
from adapter_doctor.kernels.lora_linear import lora_linear, lora_linear_reference
from adapter_doctor.runtime.eligibility import is_lora_linear, lora_parts, why_not_fused
from peft import LoraConfig, get_peft_model

IN, OUT, R = 37, 29, 5  # odd sizes


class Tiny(torch.nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT, bias=bias)

    def forward(self, x):
        return self.proj(x)


def lora_layer(dtype=torch.float32, bias=True, **config):
    torch.manual_seed(0)
    options = {"r": R, "lora_alpha": 11, "target_modules": ["proj"], "lora_dropout": 0.0, **config}
    model = get_peft_model(Tiny(bias).to(dtype), LoraConfig(**options))
    layer = model.base_model.model.proj
    for name in layer.lora_B:
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.5)
    return model, layer


def x_like(dtype=torch.float32):
    return torch.randn(3, 7, IN, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()


def run(fn, x, params):
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    out = fn(x)
    out.backward(torch.ones_like(out))
    return out, x.grad, [p.grad.clone() for p in params]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_peft_forward_and_backward(dtype, bias):
    # Same operations as PEFT's lora.Linear, so equal bit for bit in fp32 and bf16.
    _, layer = lora_layer(dtype, bias)
    parts = lora_parts(layer)
    assert parts is not None and parts.scaling == layer.scaling["default"]
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    ours = run(lambda x: lora_linear_reference(x, *parts), x_like(dtype), params)
    theirs = run(layer, x_like(dtype), params)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp32_equals_the_merged_weight_in_float64():
    _, layer = lora_layer()
    w, b, a, bb, s = lora_parts(layer)
    x = x_like()
    merged = (w.double() + s * bb.double() @ a.double())
    expected = x.double() @ merged.T + b.double()
    torch.testing.assert_close(lora_linear_reference(x, w, b, a, bb, s).double(), expected, rtol=1e-5, atol=1e-5)


def test_bf16_base_with_fp32_adapter_matches_peft():
    # PEFT keeps adapter weights in fp32 on a bf16 base (autocast_adapter_dtype): x is cast up, the sum cast down.
    _, layer = lora_layer(torch.bfloat16)
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    parts = lora_parts(layer)
    x = x_like(torch.bfloat16)
    ours = lora_linear_reference(x, *parts)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, layer(x), rtol=0, atol=0)


def test_bf16_within_rounding_of_float64():
    _, layer = lora_layer(torch.bfloat16)
    w, b, a, bb, s = lora_parts(layer)
    x = x_like(torch.bfloat16)
    expected = x.double() @ (w.double() + s * bb.double() @ a.double()).T + b.double()
    torch.testing.assert_close(lora_linear_reference(x, w, b, a, bb, s).double(), expected, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("config,reason", [
    ({"lora_dropout": 0.1}, "lora_dropout=0.1"),
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_ineligible_configurations_say_why(config, reason):
    _, layer = lora_layer(**config)
    assert is_lora_linear(layer)
    assert why_not_fused(layer) == reason
    assert lora_parts(layer) is None


def test_dynamic_states_are_read_at_every_call():
    model, layer = lora_layer()
    assert lora_parts(layer) is not None
    with model.disable_adapter():
        assert why_not_fused(layer) == "adapters disabled"
    layer.merge()
    assert why_not_fused(layer) == "adapter merged into the base weight"
    layer.unmerge()
    model.add_adapter("second", LoraConfig(r=R, target_modules=["proj"]))
    model.base_model.set_adapter(["default", "second"])
    assert why_not_fused(layer) == "2 active adapters"
    model.base_model.set_adapter("second")
    assert lora_parts(layer).lora_a is layer.lora_A["second"].weight


def test_hooks_keep_the_module_call():
    _, layer = lora_layer()
    for register in (layer.base_layer.register_forward_hook, layer.register_full_backward_hook,
                     torch.nn.modules.module.register_module_forward_pre_hook):
        handle = register(lambda *a: None)
        assert why_not_fused(layer) == "module hooks"
        handle.remove()
        assert lora_parts(layer) is not None


def test_plain_modules_are_not_lora():
    assert not is_lora_linear(torch.nn.Linear(3, 3))
    assert lora_parts(torch.nn.Linear(3, 3)) is None


def test_dispatch_on_cpu_is_the_reference():
    _, layer = lora_layer()
    parts = lora_parts(layer)
    x = x_like()
    torch.testing.assert_close(lora_linear(x, *parts), lora_linear_reference(x, *parts), rtol=0, atol=0)
