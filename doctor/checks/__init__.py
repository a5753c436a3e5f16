"""The check registry.

Each module in this package declares its checks (stable id, category, severity, fixer) with
`register` and one `@runner` function that yields findings for an adapter. `run_checks` isolates
runners from each other: a crash in one becomes a finding, never a traceback.
"""
from __future__ import annotations

import importlib
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ..artifact import Artifact
from ..base_model import BaseModel, BaseResolution
from ..config_kind import not_peft
from ..env import Env
from ..finding import Finding, Fix, Severity
from ..knowledge import FieldSpec, Release, peft_table
from ..user_regex import Matcher

MODULES = (
    "config_invalid",
    "config_version",
    "base_model",
    "weights",
    "keys_prefix",
    "keys_unmatched",
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


@dataclass
class Context:
    artifact: Artifact
    env: Env
    resolution: BaseResolution = field(default_factory=lambda: BaseResolution(None))
    scan_values: bool = True
    matcher: Matcher = field(default_factory=Matcher)  # the config's regexes share one time budget

    def config_file(self, key: str | None = None) -> str:
        return f"{self.artifact.config_path}#/{key}" if key else str(self.artifact.config_path)

    @property
    def base(self) -> BaseModel | None:
        return self.resolution.base

    @property
    def target_release(self) -> Release:
        """The PEFT release the adapter is judged against (the newest known when PEFT is absent)."""
        table = peft_table()
        return table.resolve(self.env.peft) if self.env.peft else table.newest

    @property
    def not_peft(self) -> bool:
        """Another tool's config, or no config PEFT could use: the checks of PEFT weights stand aside."""
        return not_peft(self.artifact.config)

    @property
    def peft_type(self) -> str | None:
        config = self.artifact.config or {}
        value = config.get("peft_type")
        return value if isinstance(value, str) and value in peft_table().all_peft_types() else None

    @property
    def target_fields(self) -> dict[str, FieldSpec]:
        return peft_table().fields(self.peft_type, self.target_release) if self.peft_type else {}


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
