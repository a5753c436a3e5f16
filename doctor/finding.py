"""Findings and reports: the objects every check, renderer and the CLI share."""
from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from enum import Enum
from typing import AbstractSet, Iterable, Sequence

CATEGORIES = (
    "config-invalid",
    "config-version",
    "base-model",
    "weights-missing",
    "weights-corrupt",
    "weights-unsafe",
    "keys-prefix",
    "keys-unmatched",
    "shape-mismatch",
    "values",
    "patch",
    "environment",
    "training-state",
)


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF.maxlist = _BRIEF.maxdict = 4


def brief(value: object) -> str:
    """A repr for a message: short whatever the value (a config may hold a 4M-entry list, or nest 900 deep)."""
    return _BRIEF.repr(value)


def sample(names: Sequence[str], shown: int = 5) -> str:
    """`a, b, c` or `a, b, c and 97 more`: a message names a few, never all of a hundred thousand."""
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head} and {len(names) - shown:,} more"


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass(frozen=True)
class Fix:
    """How to repair a finding: a `doctor fix` fixer id, or null with a manual instruction."""

    fixer: str | None
    description: str


@dataclass(frozen=True)
class Finding:
    id: str
    category: str
    severity: Severity
    title: str
    message: str
    path: str
    fix: Fix | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "category": self.category,
            "severity": self.severity.value,
            "title": self.title,
            "message": self.message,
            "path": self.path,
            "fix": None if self.fix is None else {"fixer": self.fix.fixer, "description": self.fix.description},
        }


@dataclass
class TargetReport:
    """Findings for one inspected thing: an adapter folder, a config file, or a live model."""

    path: str
    kind: str
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None  # the target could not be read at all (exit code 2)


@dataclass
class Report:
    targets: list[TargetReport] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        return [f for t in self.targets for f in t.findings]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Severity}
        for f in self.findings:
            out[f.severity.value] += 1
        return out

    def exit_code(self, threshold: Severity = Severity.ERROR) -> int:
        """0: nothing at or above the threshold; 1: findings at or above it; 2: a target was unreadable."""
        if any(t.error for t in self.targets):
            return 2
        return 1 if any(f.severity.rank >= threshold.rank for f in self.findings) else 0


def filter_findings(findings: Iterable[Finding], select: AbstractSet[str], ignore: AbstractSet[str]) -> list[Finding]:
    """Keep findings whose id or category is selected (all when `select` is empty) and not ignored."""

    def matches(f: Finding, names: AbstractSet[str]) -> bool:
        return f.id in names or f.category in names

    return [f for f in findings if (not select or matches(f, select)) and not matches(f, ignore)]
