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
