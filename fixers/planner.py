"""Turn an adapter's findings into a `Plan`: each fixer proposes, nothing is written."""
from __future__ import annotations

import copy
from pathlib import Path

from adapter_doctor.diagnose import Options, examine, findings_of
from adapter_doctor.env import Env
from adapter_doctor.finding import Finding, Severity
from adapter_doctor.targets import Target, TargetError, discover

from . import (
    bone_to_miss,
    canonicalize_keys,
    cast_dtype,
    migrate_config,
    migrate_layout,
    moe_swap,
    pickle_to_safetensors,
    set_base,
)
from .atomic import Fingerprint
from .context import FixContext, FixOptions
from .journal import recover
from .plan import ABSENT, FixerPlan, Plan, Refusal, WeightsJob

# Order matters: config edits first (later fixers read the edited config), then names, then data.
FIXERS = (migrate_config, set_base, canonicalize_keys, migrate_layout, moe_swap, bone_to_miss, pickle_to_safetensors,
          cast_dtype)
# Fixers that act on an option alone, without a finding naming them.
_ON_REQUEST = {set_base.ID: lambda o: o.set_base is not None, cast_dtype.ID: lambda o: o.dtype is not None}


def single_target(path: Path) -> Target:
    targets = discover(path)
    if len(targets) != 1:
        raise TargetError(f"{path} holds {len(targets)} adapters; fix them one by one: "
                          + ", ".join(str(t.root) for t in targets))
    return targets[0]


def _wanted(f: Finding, only: frozenset[str]) -> bool:
    if only:
        return f.id in only or f.category in only
    return f.severity is not Severity.INFO


def plan(path: Path | str, options: FixOptions | None = None) -> Plan:
    """What `doctor fix` would change in the adapter at `path`. Raises TargetError for a bad path."""
    options = options or FixOptions()
    target = single_target(Path(path))
    folder = target.config_path.name == "adapter_config.json"  # else a lone config, fixed on its own
    if folder:
        recover(target.root)  # a killed earlier run is finished or undone before anything is read
    # Taken before anything is read, so that a save while the plan is made is seen when it is written.
    before = _fingerprints(target.root if folder else None, target.config_path)
    env = Env.detect(options.target_peft, options.target_transformers)
    check = examine(target, Options(base=options.base), env)
    art = check.artifact
    findings = [f for f in findings_of(check) if _wanted(f, options.only)]
    result = Plan(target.root, target.config_path, art.config, copy.deepcopy(art.config), findings)
    if art.config is None:
        result.refusals = [Refusal(f.id, f.fix.description if f.fix else f.title) for f in findings]
        return result
    primary = art.primary_weights
    job = WeightsJob(primary.path, metadata=primary.header.metadata if primary.header else None) if primary else None
    rewriter: str | None = None  # the fixer whose whole new tensor set the job writes
    for fixer in FIXERS:
        mine = [f for f in findings if f.fix and f.fix.fixer == fixer.ID]
        if mine or _ON_REQUEST.get(fixer.ID, lambda o: False)(options):
            part = fixer.plan(FixContext(art, check, mine, options, result.config_after))
            if part.tensors is not None and rewriter is not None:
                part = _second_rewrite(part, mine, rewriter)
            elif part.tensors is not None:
                rewriter = fixer.ID
            _merge(result, job, part)
    handled = {f.id for f in findings if f.fix and f.fix.fixer} | {r.finding for r in result.refusals}
    result.refusals += [Refusal(f.id, f"fix by hand: {f.fix.description if f.fix else f.title}")
                        for f in findings if f.id not in handled and f.severity is not Severity.INFO]
    if job and (job.renames or job.cast or job.from_pickle or job.tensors is not None):
        result.weights = job
    result.fingerprints = {p.name: before.get(p.name) for p in [target.config_path, *(w.path for w in art.weights)]}
    return result


def _fingerprints(root: Path | None, config: Path) -> dict[str, Fingerprint]:
    paths = [config, *(p for p in root.iterdir() if p.name != config.name)] if root else [config]
    return {p.name: Fingerprint.of(p) for p in paths if p.is_file()}


def _second_rewrite(part: FixerPlan, mine: list[Finding], rewriter: str) -> FixerPlan:
    """A refusal in place of a second whole tensor set: each is made from the file as read, so writing one
    would silently drop the other's change."""
    answers = sorted({c.finding for c in part.changes} | {e.finding for e in part.edits}) or [f.id for f in mine]
    reason = f"{rewriter} rewrites the tensors in this run too; run doctor fix again once it is done"
    return FixerPlan(refusals=part.refusals + [Refusal(a, reason) for a in answers])


def _merge(result: Plan, job: WeightsJob | None, part: FixerPlan) -> None:
    for edit in part.edits:
        if edit.after is ABSENT:
            result.config_after.pop(edit.key, None)
        else:
            result.config_after[edit.key] = edit.after
    result.edits += part.edits
    result.changes += part.changes
    result.refusals += part.refusals
    result.remove |= part.remove
    if job is not None:
        job.renames.update(part.renames)
        job.cast = part.cast or job.cast
        job.from_pickle |= part.from_pickle
        if part.tensors is not None:
            job.tensors = part.tensors
