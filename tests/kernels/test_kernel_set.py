"""The kernel-set registry, and that importing it loads no ML framework."""
import json
import subprocess
import sys

import pytest
from adapter_doctor.kernels import TORCH, available, kernel_set
from adapter_doctor.kernels.lora_linear import lora_linear_reference
from adapter_doctor.kernels.rms_norm import rms_norm_reference


def test_auto_is_the_fastest_available_and_torch_is_always_there():
    assert "torch" in available()
    assert kernel_set("auto").name == available()[-1]
    assert kernel_set("torch") is TORCH
    assert TORCH.rms_norm is rms_norm_reference and TORCH.lora_linear is lora_linear_reference


def test_unknown_set_raises():
    with pytest.raises(ValueError, match="not available"):
        kernel_set("cuda-magic")


def test_import_loads_neither_torch_nor_triton():
    code = ("import sys, json, adapter_doctor.kernels, adapter_doctor.runtime\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'triton', 'transformers', 'peft'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_triton_set_is_offered_only_with_cuda_and_triton(monkeypatch):
    import adapter_doctor.kernels as kernels

    monkeypatch.setattr(kernels, "_triton_usable", lambda: False)
    assert available() == ["torch"] and kernel_set("auto") is TORCH
    with pytest.raises(ValueError, match="not available"):
        kernel_set("triton")
    monkeypatch.setattr(kernels, "_triton_usable", lambda: True)
    assert available() == ["torch", "triton"] and kernel_set("auto") is kernels.TRITON


def test_sets_carry_the_multi_projection_and_loss_entries():
    from adapter_doctor.kernels import TRITON, KernelSet
    from adapter_doctor.kernels.cross_entropy import cross_entropy_reference, linear_cross_entropy
    from adapter_doctor.kernels.lora_linear import lora_multi_linear, lora_multi_linear_reference

    assert TORCH.lora_multi_linear is lora_multi_linear_reference
    assert TORCH.linear_cross_entropy is cross_entropy_reference
    assert TRITON.lora_multi_linear is lora_multi_linear and TRITON.linear_cross_entropy is linear_cross_entropy
    older = KernelSet("older", *(getattr(TORCH, f) for f in ("rms_norm", "rope", "swiglu", "geglu", "lora_linear")))
    assert older.lora_multi_linear is lora_multi_linear_reference  # sets built before these fields still work
