"""The patched LoRA training runtime: per-instance patches for Hugging Face causal LMs.

`ensure_patched(model)` swaps supported modules to subclasses whose forwards run the fused kernels,
repairs modules a foreign runtime left broken, and returns a PatchReport; `unpatch(model)` undoes it.
Importing this package imports neither torch, transformers nor triton.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import PatchError, PatchReport

__all__ = ["PatchError", "PatchReport", "attach_packing_guard", "enable_offloaded_checkpointing", "ensure_patched",
           "host_plan", "load", "return_logits", "save_adapter", "unpatch"]


def ensure_patched(model: Any, *, strict: bool = False, kernels: Any = "auto") -> PatchReport:
    """Patch `model` in place (idempotent, all or nothing) and report what was done to each module."""
    from .engine import patch

    return patch(model, strict=strict, kernels=kernels)


def unpatch(model: Any) -> int:
    """Restore every module `ensure_patched` changed; returns how many."""
    from .engine import unpatch as _unpatch

    return _unpatch(model)


def __getattr__(name: str) -> Any:
    if name in ("PatchReport", "PatchError"):
        from . import report

        return getattr(report, name)
    if name == "save_adapter":
        from .saver import save_adapter

        return save_adapter
    if name == "load":
        from .loader import load

        return load
    if name == "return_logits":
        from .causal_lm import return_logits

        return return_logits
    if name == "attach_packing_guard":
        from .packing import attach_guard

        return attach_guard
    if name in ("enable_offloaded_checkpointing", "host_plan"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'adapter_doctor.runtime' has no attribute {name!r}")
