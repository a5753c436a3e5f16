"""The human view of a fix plan: each edit with the finding it answers, a config diff, tensor changes."""
from __future__ import annotations

import difflib

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

MAX_ROWS = 12


def render_plan(plan) -> RenderableType:
    title = Text.assemble((str(plan.target), "bold underline"))
    if plan.empty and not plan.refusals:
        return Group(title, Text("  ✓ nothing to fix", style="green"))
    parts: list[RenderableType] = [title]
    for edit in plan.edits:
        before, after = edit.shown()
        parts.append(Text.assemble("  ", (edit.finding, "dim"), f" {edit.key}: {before} -> {after}", (f"  ({edit.reason})", "dim")))
    if plan.edits:
        parts.append(_diff(plan))
    if plan.changes:
        parts.append(_changes(plan))
    for name in sorted(plan.remove):
        parts.append(Text(f"  {name} moves to the backup", style="yellow"))
    for refusal in plan.refusals:
        parts.append(Text.assemble("  ", ("refused ", "bold red"), (refusal.finding, "dim"), f" {refusal.reason}"))
    return Group(*parts)


def _diff(plan) -> Text:
    name = plan.config_path.name
    lines = difflib.unified_diff(plan.config_text(False).splitlines(), plan.config_text(True).splitlines(),
                                 f"a/{name}", f"b/{name}", lineterm="")
    text = Text()
    for line in lines:
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else "cyan" if line.startswith("@") else ""
        text.append("    " + line + "\n", style=style)
    return text


def _changes(plan) -> Table:
    table = Table("finding", "change", "from", "to", box=None, pad_edge=False, padding=(0, 1))
    for change in plan.changes[:MAX_ROWS]:
        # Text, not markup: tensor names and notes may hold brackets ("adapter-doctor[torch]", "layers[0]").
        table.add_row(*(Text(cell) for cell in (change.finding, change.what, change.before, change.after)))
    if len(plan.changes) > MAX_ROWS:
        table.add_row("", f"... {len(plan.changes) - MAX_ROWS} more", "", "")
    return table
