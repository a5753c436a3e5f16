"""The check registry.

Each module in this package declares its checks (stable id, category, severity, fixer) with
`register` and one `@runner` function that yields findings for an adapter. `run_checks` isolates
runners from each other: a crash in one becomes a finding, never a traceback.
"""
from __future__ import annotations

import importlib
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ..check_context import Context
from ..finding import Finding, Fix, Severity

MODULES = (
    "config_invalid",
    "config_version",
    "base_model",
    "weights",
    "keys_prefix",
    "keys_unmatched",
    "module_renames",
    "shape_mismatch",
    "values",
    "training_state",
    "environment",
    "provenance",
    "patch",
)


@dataclass(frozen=True)
class Check:
    id: str
    category: str
    severity: Severity
    title: str
    explain: str
    fixer: str | None = None  # the `doctor fix` fixer that repairs it
    manual: str | None = None  # what to do by hand when no fixer applies

    def finding(self, message: str, path: str, *, severity: Severity | None = None, title: str | None = None,
                fix: Fix | None = None) -> Finding:
        if fix is None and (self.fixer or self.manual):
            fix = Fix(self.fixer, self.manual or f"doctor fix --only {self.id}")
        return Finding(self.id, self.category, severity or self.severity, title or self.title, message, path, fix)


Runner = Callable[[Context], Iterable[Finding]]
REGISTRY: dict[str, Check] = {}
_RUNNERS: list[tuple[str, Runner]] = []
INTERNAL = Check(
    "ADC000", "environment", Severity.ERROR, "Internal error in a check",
    "A check crashed on this input. The other checks still ran. Please report it with `doctor env` output.",
)


def register(*checks: Check) -> None:
    for check in checks:
        if check.id in REGISTRY and REGISTRY[check.id] != check:
            raise ValueError(f"duplicate check id {check.id}")
        REGISTRY[check.id] = check


def runner(fn: Runner) -> Runner:
    _RUNNERS.append((fn.__module__.rsplit(".", 1)[-1], fn))
    return fn


def load_all() -> None:
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")


def all_checks() -> list[Check]:
    load_all()
    return sorted([INTERNAL, *REGISTRY.values()], key=lambda c: c.id)


def run_checks(ctx: Context) -> Iterator[Finding]:
    load_all()
    for module, fn in _RUNNERS:
        try:
            yield from fn(ctx)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            where = traceback.extract_tb(exc.__traceback__)[-1]
            yield INTERNAL.finding(
                f"check module {module!r} raised {type(exc).__name__}: {exc} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})",
                str(ctx.artifact.root),
            )
