"""The `doctor` command line. The only module that prints."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .finding import Severity

EXIT_CODES = """\b
Exit codes:
  0  no errors (warnings allowed unless --strict)
  1  findings at or above the threshold (errors; warnings too with --strict)
  2  usage error, or a path that could not be read at all"""


def _ids(values: tuple[str, ...]) -> frozenset[str]:
    from .checks import all_checks
    from .finding import CATEGORIES

    names = {part.strip() for v in values for part in v.split(",") if part.strip()}
    known = {c.id for c in all_checks()} | set(CATEGORIES)
    unknown = sorted(names - known)
    if unknown:
        raise click.BadParameter(f"unknown check id or category: {', '.join(unknown)} (see `doctor list-checks`)")
    return frozenset(names)


def _version(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from .knowledge import parse_version

    if value is not None and parse_version(value) is None:
        raise click.BadParameter(f"{value!r} is not a version number")
    return value


def _console(stderr: bool = False):
    from rich.console import Console

    # rich drops colour by itself when the stream is not a terminal, and honours NO_COLOR. Piped output is
    # not wrapped, so each message stays on one line for grep and CI logs.
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = 1 << 16
    return console


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="adapter-doctor")
def main() -> None:
    """Find (and fix) what breaks when a saved LoRA adapter is loaded somewhere else.

    \b
    doctor check ./my-adapter              inspect a saved adapter (no torch needed)
    doctor check ./out --target-peft 0.13  judge it against another PEFT release
    doctor list-checks                     every check with its id
    doctor explain ADC501                  why a check exists and how to fix it
    doctor env                             versions for a bug report
    """


@main.command(epilog=EXIT_CODES)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Build this base model on CPU (with torch) and inspect what its modules will run.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="With --model: attach this adapter (trainable, as a resumed run would) before inspecting.")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base model folder (config.json, weights optional) to check shapes and module names against.")
@click.option("--target-peft", metavar="VERSION", callback=_version,
              help="Judge against this PEFT release instead of the installed one (it need not be installed).")
@click.option("--target-transformers", metavar="VERSION", callback=_version,
              help="Judge module layouts against this transformers release instead of the installed one.")
@click.option("--format", "fmt", type=click.Choice(["rich", "json", "sarif"]), default="rich", show_default=True)
@click.option("--select", multiple=True, metavar="IDS", help="Only these check ids or categories (comma-separated).")
@click.option("--ignore", multiple=True, metavar="IDS", help="Skip these check ids or categories (comma-separated).")
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too.")
@click.option("-v", "--verbose", is_flag=True, help="Also show info findings.")
@click.option("--no-scan", is_flag=True, help="Skip reading tensor data (NaN/zero scans, .bin vs .safetensors).")
def check(paths: tuple[Path, ...], model_dir: Path | None, adapter: Path | None, base: Path | None,
          target_peft: str | None, target_transformers: str | None, fmt: str, select: tuple[str, ...],
          ignore: tuple[str, ...], strict: bool, verbose: bool, no_scan: bool) -> None:
    """Inspect saved adapters: folders, adapter_config.json files, Trainer checkpoints.

    PATHS may be adapter folders, adapter_config.json files, checkpoint-N folders, or folders holding several
    named adapters. Nothing is imported from torch, transformers or peft. With --model, the base model is
    built on CPU (this needs the [torch] extra) and its modules are inspected as they would run.
    """
    from .diagnose import Options

    if not paths and model_dir is None:
        raise click.UsageError("give adapter PATHS, or --model BASE_DIR")
    if adapter is not None and model_dir is None:
        raise click.UsageError("--adapter needs --model")
    options = Options(base, target_peft, target_transformers, _ids(select), _ids(ignore), not no_scan)
    report, env = _run(paths, options, progress=fmt == "rich")
    if model_dir is not None:
        from .live import inspect_saved_model

        live = inspect_saved_model(model_dir, adapter)
        report.targets += [_filtered(t, options) for t in live.targets]
    threshold = Severity.WARNING if strict else Severity.ERROR
    if fmt == "json":
        from .render.json_report import to_json

        click.echo(json.dumps(to_json(report, env, threshold), indent=2))
    elif fmt == "sarif":
        from .render.sarif_report import to_sarif

        click.echo(json.dumps(to_sarif(report), indent=2))
    else:
        from .render.rich_report import render_target, summary

        console = _console()
        for target in report.targets:
            console.print(render_target(target, verbose))
            console.print()
        console.print(summary(report, verbose))
    sys.exit(report.exit_code(threshold))


def _filtered(target, options):
    from .finding import filter_findings

    target.findings = filter_findings(target.findings, options.select, options.ignore)
    return target


def _run(paths: tuple[Path, ...], options, progress: bool):
    from .diagnose import iter_reports, plan_targets, weights_bytes
    from .env import Env
    from .finding import Report
    from .targets import Target

    env = Env.detect(options.target_peft, options.target_transformers)
    planned = plan_targets(paths)
    size = sum(weights_bytes(t) for _, t in planned if isinstance(t, Target))
    report = Report()
    if not (progress and sys.stderr.isatty() and (size > 256 << 20 or len(planned) > 20)):
        report.targets = list(iter_reports(planned, options, env))
        return report, env
    bar, task = _progress(len(planned))
    with bar:
        for target in iter_reports(planned, options, env):
            report.targets.append(target)
            bar.advance(task)
    return report, env


def _progress(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    progress = Progress(TextColumn("checking"), BarColumn(), MofNCompleteColumn(), console=_console(stderr=True),
                        transient=True)
    return progress, progress.add_task("check", total=total)


FIX_CODES = """\b
Exit codes:
  0  nothing to change (dry run), or the fix was written and no error is left
  1  changes are planned (dry run), errors remain after writing, or every edit was refused (--inplace, --out)
  2  usage error, an unreadable path, or a write that failed (the original is intact)"""


@main.command(epilog=FIX_CODES)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--inplace", is_flag=True, help="Rewrite the adapter in place (atomically, with a backup).")
@click.option("--out", type=click.Path(path_type=Path), help="Write a fixed copy here; the original stays untouched.")
@click.option("--target-peft", metavar="VERSION", callback=_version, help="Make the adapter loadable by this PEFT release.")
@click.option("--target-transformers", metavar="VERSION", callback=_version, help="Move layouts to this transformers release.")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path), help="The base model folder.")
@click.option("--only", multiple=True, metavar="IDS", help="Fix only these check ids or categories (info findings too).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16"]), help="Cast float tensors (opt-in: it rounds).")
@click.option("--set-base", metavar="NAME_OR_PATH", help="Record this base model in adapter_config.json.")
@click.option("--yes", is_flag=True, help="Do not ask before writing.")
@click.option("--format", "fmt", type=click.Choice(["rich", "json"]), default="rich", show_default=True)
def fix(paths: tuple[Path, ...], inplace: bool, out: Path | None, target_peft: str | None, target_transformers: str | None,
        base: Path | None, only: tuple[str, ...], dtype: str | None, set_base: str | None, yes: bool, fmt: str) -> None:
    """Repair saved adapters. Without --inplace or --out it only shows the plan (a dry run).

    Every edit names the finding it answers. Config changes show as a diff, tensor changes as a table.
    --inplace swaps the fixed files in atomically and keeps the originals in <adapter>/.doctor-backup/<time>/;
    the result is checked before it replaces anything. A fix that cannot keep the adapter's meaning is
    refused with the reason.
    """
    from .fixers import FixOptions

    if inplace and out:
        raise click.UsageError("--inplace and --out exclude each other")
    options = FixOptions(target_peft, target_transformers, base, _ids(only), dtype, set_base)
    console = _console()
    records, code = [], 0
    for path in paths:
        record, path_code = _fix_one(path, options, console, fmt, inplace, out, yes, many=len(paths) > 1)
        records.append(record)
        code = max(code, path_code)
    if fmt == "json":
        click.echo(json.dumps({"schema": 1, "fixes": records}, indent=2, default=str))
    elif not (inplace or out) and code == 1:
        console.print("dry run: nothing was written (--inplace or --out DIR writes the fix)", style="dim")
    sys.exit(code)


def _fix_one(path: Path, options, console, fmt: str, inplace: bool, out: Path | None, yes: bool, *,
             many: bool) -> tuple[dict, int]:
    """Plan, show and (with --inplace or --out) apply the fix of one target: its record and exit code."""
    from .fixers import FixWriteError, apply, plan
    from .targets import TargetError

    try:
        p = plan(path, options)
    except TargetError as exc:
        _say(console, fmt, f"✗ {exc}", "bold red")
        return {"target": str(path), "error": str(exc)}, 2
    record = p.to_dict()
    if fmt == "rich":
        from .render.plan_report import render_plan

        console.print(render_plan(p))
    if p.empty:
        return record, 1 if p.refusals and (inplace or out) else 0  # every edit refused: the findings remain
    if not (inplace or out):
        return record, 1
    if inplace and not yes and not _confirm(p):
        _say(console, fmt, f"skipped {p.target}", "yellow")
        return record, 1
    try:
        result = apply(p, inplace=inplace, out=out / p.target.name if out and many else out, options=options)
    except (FixWriteError, OSError) as exc:
        record["error"] = str(exc)
        _say(console, fmt, f"✗ {exc}", "bold red")
        return record, 2
    record.update(written=str(result.written), backup=str(result.backup) if result.backup else None,
                  after=result.after.counts())
    if fmt == "rich":
        _summary(console, p, result)
    return record, 1 if record["after"]["error"] else 0


def _say(console, fmt: str, message: str, style: str) -> None:
    if fmt == "rich":
        console.print(message, style=style, markup=False)  # paths and errors may hold brackets
    else:
        click.echo(message, err=True)


def _confirm(p) -> bool:
    if not sys.stdin.isatty():
        raise click.UsageError("--inplace asks before writing; pass --yes when there is no terminal to ask on")
    return click.confirm(f"Write these changes to {p.target}?", default=False)


def _summary(console, p, result) -> None:
    before = sum(1 for f in p.findings if f.severity.value == "error")
    after = result.after.counts()
    console.print(f"wrote {', '.join(result.files)} in {result.written}", style="green")
    if result.backup:
        console.print(f"originals kept in {result.backup}")
    console.print(f"errors before: {before}, after: {after['error']} ({after['warning']} warnings left)")


@main.command("list-checks")
@click.option("--format", "fmt", type=click.Choice(["rich", "json"]), default="rich", show_default=True)
def list_checks(fmt: str) -> None:
    """List every check: id, category, default severity, fixer and title."""
    from .checks import all_checks

    checks = all_checks()
    if fmt == "json":
        click.echo(json.dumps([{"id": c.id, "category": c.category, "severity": c.severity.value, "title": c.title,
                                "fixer": c.fixer} for c in checks], indent=2))
        return
    from rich.table import Table

    table = Table("id", "category", "severity", "fixer", "title", box=None, pad_edge=False)
    for c in checks:
        table.add_row(c.id, c.category, c.severity.value, c.fixer or "-", c.title)
    _console().print(table)


@main.command()
@click.argument("check_id")
def explain(check_id: str) -> None:
    """Explain one check: what it detects, why it matters, and how to fix it."""
    from .checks import all_checks

    found = {c.id: c for c in all_checks()}.get(check_id.upper())
    if found is None:
        raise click.BadParameter(f"no check {check_id!r} (see `doctor list-checks`)", param_hint="CHECK_ID")
    click.echo(f"{found.id}  {found.title}\ncategory: {found.category}   default severity: {found.severity.value}\n")
    click.echo(found.explain)
    if found.fixer:
        extra = (found.manual or "").removeprefix(f"doctor fix --only {found.id}") if found.manual else ""
        click.echo(f"\nfix: doctor fix PATH --only {found.id}{extra}   (fixer: {found.fixer})")
    elif found.manual:
        click.echo(f"\nfix: {found.manual}")


ENV_CODES = """\b
Exit codes:
  0  no problem found
  1  a known-bad combination of installed versions, or a local file or folder that shadows a library
  2  usage error"""


@main.command(epilog=ENV_CODES)
@click.option("--format", "fmt", type=click.Choice(["rich", "json"]), default="rich", show_default=True)
def env(fmt: str) -> None:
    """Print installed versions, known-bad combinations and shadowed libraries, for bug reports."""
    from .env_report import collect

    info = collect(Path.cwd())
    if fmt == "json":
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo("Copy-and-paste the text below into your bug report.\n")
        for key, value in {**info["versions"], **info["platform"]}.items():
            click.echo(f"- {key}: {value or 'not installed'}")
        for problem in info["problems"]:
            click.echo(f"! {problem}")
    sys.exit(1 if info["problems"] else 0)


def run() -> None:
    """Console entry point: a crash prints one line, not a traceback (DOCTOR_DEBUG=1 shows it)."""
    # The value scan uses numpy without BLAS; its thread pool would only slow the start.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        main(standalone_mode=True)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("DOCTOR_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]  # one line, whatever the message holds
        click.echo(f"doctor: internal error: {type(exc).__name__}: {first} (set DOCTOR_DEBUG=1 for details)", err=True)
        sys.exit(2)
