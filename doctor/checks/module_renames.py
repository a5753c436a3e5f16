"""keys-unmatched: target_modules and keys written with module names that transformers 5 renamed.

transformers renames an architecture's checkpoint keys on load (`knowledge/transformers_renames.json`, read from
its conversion mappings), and builds the model with the new names. PEFT matches `target_modules` against those
names and never renames them; it renames adapter keys only for model types whose conversion mapping is
registered under their model_type, and only from the release in `peft_behaviours.json`. VLM and MoE layouts are
judged by ADC514 from their own facts.
"""
from __future__ import annotations

from typing import Iterator

from ..adapter_keys import ModuleSelector, entry_names
from ..base_model import layout_release
from ..finding import Finding, Fix, Severity, brief
from ..transformers_renames import LEGACY, NewerNames, RenameVerdict, Renaming
from . import Check, Context, register, runner

CAT = "keys-unmatched"
RENAMED = Check(
    "ADC518", CAT, Severity.ERROR, "Module names that transformers renamed",
    "transformers 5 renames some architectures' modules (ViT's `encoder.layer.N.attention.attention.query` is "
    "`layers.N.attention.q_proj` from 5.9) and builds the model with the new names. An adapter trained before "
    "uses the old ones: its target_modules then match nothing (`NoMatchingPeftModuleError: Target modules ... not "
    "found in the base model`) or fewer modules, and its keys load nowhere unless PEFT renames them for that "
    "model type.",
    manual="Rename target_modules and the tensor keys to the new names (the finding lists them), or load with a "
           "transformers release before the rename.")
LAYOUT_ASSUMED = Check(
    "ADC519", CAT, Severity.INFO, "Base judged in the newest known transformers layout",
    "No transformers is installed and no --target-transformers was given, so the base model's module names are "
    "built as the newest transformers release the doctor knows builds them. The verdict is the one that release "
    "would give; pass --target-transformers to judge another.")
NEWER = Check(
    "ADC520", CAT, Severity.ERROR, "Module names of a newer transformers",
    "The adapter was saved with a transformers release that builds the base with new module names (ViT's "
    "`layers.N.attention.q_proj` from 5.9), and is loaded with an older one, which builds the old names "
    "(`encoder.layer.N.attention.attention.query`). Its target_modules then match nothing "
    "(`ValueError: Target modules ... not found in the base model`) or fewer modules, and no release renames "
    "its keys back.",
    manual="Load with the newer transformers, or rename target_modules and the tensor keys to the old names (the "
           "finding lists them).")
register(RENAMED, LAYOUT_ASSUMED, NEWER)


@runner
def check(ctx: Context) -> Iterator[Finding]:
    if ctx.base is not None and ctx.env.transformers is None:
        yield LAYOUT_ASSUMED.finding(
            f"no transformers installed and no --target-transformers: the base at {ctx.base.path} is judged as "
            f"transformers {ctx.base.layout} builds it", str(ctx.base.path / "config.json"))
    if ctx.newer_names is not None:
        yield _newer_finding(ctx, ctx.newer_names)
    found = ctx.renames
    if found is None or not found.broken:
        return
    yield _finding(ctx, found)


def _finding(ctx: Context, v: RenameVerdict) -> Finding:
    release, tf = ctx.target_release, layout_release(ctx.env.transformers)
    targeted = ModuleSelector(ctx.artifact.config.get("target_modules"), ctx.matcher)
    first = next((r for r in v.renamed if targeted(r.old)), v.renamed[0])  # a LoRA module before a saved one
    arch = next((s.key for s in v.scopes if s.key != LEGACY), "this architecture")
    parts = [f"transformers {v.since} renamed {arch}'s modules, and {len(v.renamed)} adapter module(s) use the old "
             f"names (e.g. {first.old} is now {first.new})."]
    targets = ctx.artifact.config.get("target_modules")
    if v.nothing_selected:
        parts.append(f"target_modules={brief(targets)} selects no module "
                     f"of transformers {tf}'s model: PEFT raises `NoMatchingPeftModuleError` (\"Target modules ... not "
                     "found in the base model\", or \"No modules were targeted for adaptation\" with modules_to_save).")
    elif v.unselected:
        parts.append(f"target_modules no longer selects {len(v.unselected)} of them (e.g. {v.unselected[0].new}): "
                     "they load without LoRA.")
    if v.keys_renamed_by_peft is None:
        parts.append("Without the base's config.json it is unknown whether PEFT renames the keys (pass --base).")
    elif not v.keys_renamed_by_peft:
        parts.append(f"PEFT {release.version} does not rename the keys for {ctx.base.model_type if ctx.base else arch}, "
                     "so they load nowhere.")
    else:
        parts.append(f"PEFT {release.version} renames the keys on load, but not target_modules.")
    new_targets = _renamed_targets(targets, v.renamed, v.model_modules)
    how = (f"set target_modules to {new_targets}" if new_targets is not None
           else "rewrite target_modules for the new names")
    if v.keys_renamed_by_peft is not True:
        how += f" and rename the tensor keys ({first.old} -> {first.new}, …)"
    how += f", or load with transformers < {v.since}"
    where = f"{ctx.artifact.primary_weights.path}#{first.old}"
    return RENAMED.finding(" ".join(parts), where, fix=Fix(None, how[0].upper() + how[1:]))


def _newer_finding(ctx: Context, v: NewerNames) -> Finding:
    tf, first = layout_release(ctx.env.transformers), v.renamed[0]
    targets = ctx.artifact.config.get("target_modules")
    parts = [f"{len(v.renamed)} adapter module(s) use the names transformers {v.since} gave {v.arch}'s modules "
             f"(e.g. {first.old}, which transformers {tf} builds as {first.new}): the adapter was saved with "
             f"transformers >= {v.since}, and transformers {tf} does not rename its keys back."]
    if v.nothing_selected:
        parts.append(f"target_modules={brief(targets)} selects no module of transformers {tf}'s model: PEFT raises "
                     "`ValueError: Target modules ... not found in the base model`.")
    old_targets = _renamed_targets(targets, v.renamed, v.model_modules)
    how = (f"load with transformers >= {v.since}, or set target_modules to "
           f"{old_targets if old_targets is not None else 'the old names'} and rename the tensor keys "
           f"({first.old} -> {first.new}, …)")
    where = f"{ctx.artifact.primary_weights.path}#{first.old}"
    return NEWER.finding(" ".join(parts), where, fix=Fix(None, how[0].upper() + how[1:]))


def _renamed_targets(targets: object, renamed: list[Renaming], names: list[str]) -> list[str] | None:
    """target_modules in the `renamed` modules' new names (among the model's `names`), where each old name maps
    onto exactly one new one; else None. Only a list is rewritten: its entries are names (PEFT never runs them as
    regexes), so every answer is a bool."""
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return None
    moved = {r.old: r.new for r in renamed}
    out = []
    for target in targets:
        olds = [old for old in moved if entry_names(target, old)]
        if not olds:
            out.append(target)
            continue
        depth = target.count(".") + 1
        news = {".".join(moved[o].split(".")[-depth:]) for o in olds}
        if len(news) != 1:
            return None
        (new,) = news
        if {n for n in names if entry_names(new, n)} != {moved[o] for o in olds} | _kept(names, target, moved):
            return None  # the new name would select modules the old one did not
        out.append(new)
    return sorted(set(out))


def _kept(names: list[str], target: str, moved: dict[str, str]) -> set[str]:
    """Modules the new name may select besides the moved ones: those the old name already selected, unmoved."""
    unmoved = set(names) - set(moved.values())
    return {n for n in unmoved if entry_names(target, n)}
