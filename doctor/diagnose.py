"""The library entry point for checking saved adapters: paths in, a `Report` out. Nothing here prints."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .artifact import WEIGHT_NAMES, read_artifact
from .base_model import resolve_base
from .check_context import Context
from .checks import run_checks
from .env import Env
from .finding import Finding, Report, TargetReport, filter_findings
from .gc_paused import gc_paused
from .targets import Target, TargetError, discover


@dataclass(frozen=True)
class Options:
    base: Path | None = None
    target_peft: str | None = None
    target_transformers: str | None = None
    select: frozenset[str] = frozenset()
    ignore: frozenset[str] = frozenset()
    scan_values: bool = True


def plan_targets(paths: Iterable[str | Path]) -> list[tuple[str, Target | TargetError]]:
    """Every adapter under `paths`, or the error that stopped a path from being read."""
    out: list[tuple[str, Target | TargetError]] = []
    seen: set[tuple[Path, Path]] = set()
    for raw in paths:
        try:
            found = discover(Path(raw))
        except TargetError as exc:
            out.append((str(raw), exc))
            continue
        for target in found:  # a folder's config and weights, both named, are one adapter
            key = (target.root.resolve(), target.config_path.resolve())
            if key not in seen:
                seen.add(key)
                out.append((str(raw), target))
    return out


def weights_bytes(target: Target) -> int:
    """How much data a value scan of `target` will read (to decide whether to show progress)."""
    total = 0
    for name in WEIGHT_NAMES:
        try:
            total += (target.root / name).stat().st_size
        except OSError:
            continue
    return total


def check_target(target: Target, options: Options, env: Env) -> TargetReport:
    # An index of a few hundred thousand tensors is as many small objects, none of them in a cycle:
    # the cycle collector's passes over them would double the time of a check.
    with gc_paused():
        return _check_target(target, options, env)


def _check_target(target: Target, options: Options, env: Env) -> TargetReport:
    ctx = examine(target, options, env)
    art = ctx.artifact
    label = str(target.config_path if art.kind == "config-only" else target.root)
    unreadable = [f"{w.path}: {w.problem}" for w in art.weights if w.format == "unreadable"]
    if art.config_problem is not None and art.config_problem.kind == "unreadable":
        unreadable.insert(0, f"{art.config_path}: {art.config_problem.message}")
    if unreadable:  # a permissions or I/O problem is not a finding about the adapter
        return TargetReport(label, art.kind, error="; ".join(unreadable))
    return TargetReport(label, art.kind, filter_findings(findings_of(ctx), options.select, options.ignore))


def examine(target: Target, options: Options, env: Env) -> Context:
    """The adapter at `target` read, with its base resolved: what the checks (and the fixers) judge."""
    art = read_artifact(target.root, target.config_path, target.name)
    config = art.config or {}
    resolution = resolve_base(config.get("base_model_name_or_path"), config.get("revision"), options.base,
                              target.root, env.transformers)
    return Context(art, env, resolution, options.scan_values)


def findings_of(ctx: Context) -> Iterator[Finding]:
    """Every registered check's findings on an examined adapter, unfiltered."""
    return run_checks(ctx)


def iter_reports(planned: list[tuple[str, Target | TargetError]], options: Options, env: Env) -> Iterator[TargetReport]:
    for raw, target in planned:
        if isinstance(target, TargetError):
            yield TargetReport(raw, "error", error=str(target))
        else:
            yield check_target(target, options, env)


def diagnose(paths: Sequence[str | Path], options: Options | None = None) -> Report:
    """Check every adapter under `paths` against the installed (or targeted) PEFT and transformers."""
    options = options or Options()
    env = Env.detect(options.target_peft, options.target_transformers)
    return Report(list(iter_reports(plan_targets(paths), options, env)))
