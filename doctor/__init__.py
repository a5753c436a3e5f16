"""adapter-doctor: find and fix what breaks when a saved LoRA adapter is loaded somewhere else."""
from __future__ import annotations

__version__ = "0.1.0"

from .diagnose import Options, diagnose  # noqa: E402
from .finding import Finding, Fix, Report, Severity, TargetReport  # noqa: E402

__all__ = ["Finding", "Fix", "Options", "Report", "Severity", "TargetReport", "__version__", "diagnose"]
