"""The human report: findings grouped by target and category, each with a mark, detail and fix hint."""
from __future__ import annotations

import shlex
from itertools import groupby

from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.text import Text

from ..finding import Finding, Report, Severity, TargetReport

MARKS = {Severity.ERROR: ("✗", "bold red"), Severity.WARNING: ("!", "bold yellow"), Severity.INFO: ("i", "cyan")}


def printable(text: str) -> str:
    """`text` with lone surrogates escaped (`\\udc80`): a config value or a file name may hold them,
    and a terminal's UTF-8 encoder raises on them."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _indent(text: Text, left: int) -> Padding:
    return Padding(text, (0, 0, 0, left), expand=False)


def fix_hint(finding: Finding, target: str) -> str | None:
    if finding.fix is None:
        return None
    if finding.fix.fixer:
        command = f"doctor fix {shlex.quote(target)} --only {finding.id}"
        # Options a fixer cannot act without (--dtype, --set-base) follow the id in the description.
        rest = finding.fix.description.removeprefix(f"doctor fix --only {finding.id}")
        return command + rest if rest != finding.fix.description else command
    return finding.fix.description


def _finding(f: Finding, target: str) -> list[RenderableType]:
    # Each line is indented on its own: padding a whole group would pad every line to the widest one.
    mark, style = MARKS[f.severity]
    lines = [_indent(Text.assemble((f"{mark} ", style), (f.id, "dim"), " ", (printable(f.title), "bold")), 4),
             _indent(Text(printable(f.message)), 8)]
    hint = fix_hint(f, target)
    if hint:
        lines.append(_indent(Text.assemble(("fix: ", "green"), printable(hint)), 8))
    return lines


def render_target(t: TargetReport, verbose: bool) -> RenderableType:
    title = Text.assemble((printable(t.path), "bold underline"), (f"  ({t.kind})", "dim"))
    if t.error:
        return Text.assemble(("✗ ", "bold red"), printable(t.error))
    shown = [f for f in t.findings if verbose or f.severity is not Severity.INFO]
    if not shown:
        return Group(title, _indent(Text("✓ no problems found", style="green"), 2))
    parts: list[RenderableType] = [title]
    ordered = sorted(shown, key=lambda f: (-f.severity.rank, f.category, f.id))
    for category, items in groupby(sorted(ordered, key=lambda f: _category_rank(ordered, f.category)), key=lambda f: f.category):
        parts.append(_indent(Text(category, style="magenta"), 2))
        for f in items:
            parts += _finding(f, t.path)
    return Group(*parts)


def _category_rank(ordered: list[Finding], category: str) -> int:
    # Categories appear in the order of their most severe finding.
    return next(i for i, f in enumerate(ordered) if f.category == category)


def summary(report: Report, verbose: bool) -> Text:
    counts = report.counts()
    unreadable = sum(1 for t in report.targets if t.error)
    n = len(report.targets)
    parts = [f"{counts['error']} error{'s' * (counts['error'] != 1)}",
             f"{counts['warning']} warning{'s' * (counts['warning'] != 1)}",
             f"{counts['info']} info"]
    style = "bold red" if counts["error"] or unreadable else "bold yellow" if counts["warning"] else "bold green"
    text = Text(f"{', '.join(parts)} in {n} target{'s' * (n != 1)}", style=style)
    if unreadable:
        text.append(f"; {unreadable} could not be read", style="bold red")
    if counts["info"] and not verbose:
        text.append("  (-v shows info findings)", style="dim")
    return text
