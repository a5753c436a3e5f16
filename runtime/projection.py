"""Calling a projection: fused LoRA when the layer allows it, the module itself otherwise."""
from __future__ import annotations

from typing import Any

from adapter_doctor.kernels import lora_parts


def project(module: Any, x: Any, kernels: Any) -> Any:
    """`module(x)`, through the kernel set's LoRA linear when `module` is an eligible PEFT lora.Linear."""
    parts = lora_parts(module)
    return module(x) if parts is None else kernels.lora_linear(x, *parts)
