"""What every fixer sees: the adapter as read, the check context, its own findings and the user's options."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapter_doctor.artifact import Artifact
from adapter_doctor.check_context import Context
from adapter_doctor.finding import Finding


@dataclass(frozen=True)
class FixOptions:
    target_peft: str | None = None
    target_transformers: str | None = None
    base: Path | None = None
    only: frozenset[str] = frozenset()  # check ids or categories; empty: every warning and error
    dtype: str | None = None  # "bf16" or "fp16": cast float tensors (opt-in)
    set_base: str | None = None  # new base_model_name_or_path


@dataclass
class FixContext:
    artifact: Artifact
    check: Context
    findings: list[Finding]  # the findings that name this fixer
    options: FixOptions
    config: dict = field(default_factory=dict)  # the config as earlier fixers left it

    def ids(self) -> set[str]:
        return {f.id for f in self.findings}
