"""What `doctor env` reports: versions, platform, GPU, known-bad combinations, shadowed libraries."""
from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

from . import __version__
from .checks.environment import incompatible_pairs
from .env import installed_version

LIBRARIES = ("torch", "transformers", "peft", "triton", "accelerate", "trl", "unsloth", "unsloth_zoo", "safetensors",
             "bitsandbytes", "liger_kernel", "kernels")


def shadowing(cwd: Path) -> list[str]:
    """Local files or folders that would be imported instead of an installed library."""
    out = []
    for lib in LIBRARIES:
        for candidate in (cwd / lib, cwd / f"{lib}.py"):
            if candidate.exists():
                out.append(f"{candidate} shadows the {lib} library when Python runs from {cwd}")
        spec = importlib.util.find_spec(lib) if installed_version(lib) else None
        origin = spec.origin if spec and spec.origin else None
        if origin and "site-packages" not in origin and "dist-packages" not in origin:
            out.append(f"`import {lib}` resolves to {origin}, not the installed distribution")
    return sorted(set(out))


def gpu_info() -> str:
    if not installed_version("torch"):
        return "torch not installed"
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install is itself worth reporting
        return f"torch fails to import: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {names[0]} (CUDA {torch.version.cuda}, capability {torch.cuda.get_device_capability(0)})"


def collect(cwd: Path) -> dict:
    versions = {"adapter-doctor": __version__, **{lib: installed_version(lib) for lib in LIBRARIES}}
    problems = incompatible_pairs(versions) + shadowing(cwd)
    return {
        "versions": versions,
        "platform": {"python": sys.version.split()[0], "platform": platform.platform(), "gpu": gpu_info()},
        "problems": problems,
    }
