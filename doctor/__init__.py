"""adapter-doctor: find and fix what breaks when a saved LoRA adapter is loaded somewhere else."""
from __future__ import annotations

__version__ = "0.1.0"

from .diagnose import Options, diagnose  # noqa: E402
from .finding import Finding, Fix, Report, Severity, TargetReport  # noqa: E402

__all__ = ["Finding", "Fix", "Options", "Report", "Severity", "TargetReport", "__version__", "diagnose",
           "ensure_patched", "inspect_model", "unpatch"]


def __getattr__(name: str):
    # The live-model API needs torch; importing the package for file checks must not.
    if name == "inspect_model":
        from .live import inspect_model

        return inspect_model
    if name in ("ensure_patched", "unpatch"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'adapter_doctor' has no attribute {name!r}")
