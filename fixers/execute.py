"""Carry out a `Plan`: build the fixed files, check them, then swap them in (or write a copy)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from adapter_doctor.diagnose import Options, diagnose
from adapter_doctor.finding import Report, Severity

from . import weights
from .atomic import Fingerprint, FixWriteError, replace_file, replace_in_place, write_copy, write_copy_file
from .context import FixOptions
from .journal import recover
from .plan import Plan, peft_json


@dataclass
class Result:
    target: Path
    written: Path | None = None  # the fixed folder (the target itself with --inplace)
    backup: Path | None = None
    files: list[str] = field(default_factory=list)
    after: Report | None = None


def _config_writer(config: dict):
    def write(path: Path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(peft_json(config))
            fh.flush()
            os.fsync(fh.fileno())

    return write


def writers(plan: Plan) -> dict:
    out = {}
    if plan.edits:
        out[plan.config_path.name] = _config_writer(plan.config_after)
    if plan.weights is not None:
        out["adapter_model.safetensors"] = weights.writer(plan.weights)
    return out


def _guard(plan: Plan):
    def check() -> None:
        for name, before in plan.fingerprints.items():
            path = plan.target / name
            now = Fingerprint.of(path) if path.is_file() else None
            if now != before:
                raise FixWriteError(f"{path} changed while it was being fixed; nothing was changed. Run the fix again.")

    return check


def _verifier(plan: Plan, options: FixOptions):
    """The fixed folder must no longer show what the plan answered, nor any new error."""
    before = {f.id for f in plan.findings if f.severity is Severity.ERROR}

    def verify(folder: Path) -> None:
        report = diagnose([folder], Options(options.base, options.target_peft, options.target_transformers))
        found = report.findings
        left = sorted({f.id for f in found} & plan.answered)
        new = sorted({f.id for f in found if f.severity is Severity.ERROR} - before)
        if left or new:
            raise FixWriteError(f"the fixed adapter would still show {', '.join(left + new)}; nothing was changed")

    return verify


def apply(plan: Plan, *, inplace: bool = False, out: Path | None = None, options: FixOptions | None = None) -> Result:
    """Write the plan. With neither `inplace` nor `out` nothing is written (a dry run)."""
    options = options or FixOptions()
    result = Result(plan.target)
    if inplace and not plan.config_only:
        recover(plan.target)  # what a killed earlier run left beside the folder
    if plan.empty or not (inplace or out):
        return result
    files = writers(plan)
    if plan.config_only:  # a lone config file: replace just that file, never its whole folder
        target = plan.config_path
        if inplace:
            result.backup = replace_file(target, files[target.name], _guard(plan), _verifier(plan, options))
            result.written = target
        else:
            write_copy_file(target, Path(out), files[target.name], _verifier(plan, options))
            result.written = Path(out)
    elif inplace:
        result.backup = replace_in_place(plan.target, files, plan.remove, _guard(plan), _verifier(plan, options))
        result.written = plan.target
    else:
        write_copy(plan.target, Path(out), files, plan.remove, _verifier(plan, options))
        result.written = Path(out)
    result.files = sorted(files) + sorted(f"{name} (removed)" for name in plan.remove)
    result.after = diagnose([result.written], Options(options.base, options.target_peft, options.target_transformers))
    return result
