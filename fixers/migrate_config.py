"""migrate-config: make adapter_config.json loadable by the target PEFT without changing what it means."""
from __future__ import annotations

from adapter_doctor.knowledge import config_fields, peft_table
from adapter_doctor.peft_load import classify_unknown

from .context import FixContext
from .plan import ABSENT, ConfigEdit, FixerPlan, Refusal

ID = "migrate-config"
# Which finding a dropped key answers, by how the key relates to the target release.
_ANSWERS = {"future": "ADC201", "legacy": "ADC203", "foreign": "ADC204"}


def plan(ctx: FixContext) -> FixerPlan:
    out = FixerPlan()
    ids = ctx.ids()
    if "ADC106" in ids:
        _add_peft_type(ctx, out)
    peft_type = ctx.config.get("peft_type")
    if isinstance(peft_type, str) and peft_type in ctx.check.target_release.peft_types:
        _drop_unknown(ctx, out, peft_type, ids)
    if "ADC304" in ids:
        out.edits.append(ConfigEdit("revision", "unsloth", None, "ADC304",
                                    "no Hub repository has a revision named \"unsloth\"; the base's default revision is meant"))
    return out


def _drop_unknown(ctx: FixContext, out: FixerPlan, peft_type: str, ids: set[str]) -> None:
    release = ctx.check.target_release
    init_only = set(config_fields()["init_only"]) | set(config_fields()["metadata"])
    unknown = classify_unknown(ctx.config, peft_type, release)
    blocking = [u for u in unknown if u.kind == "future" and not u.at_default and u.key not in init_only]
    if blocking:  # half a migration would still not load faithfully: refuse it all
        u = blocking[0]
        out.refusals.append(Refusal("ADC202", f"{u.key}={ctx.config[u.key]!r} needs PEFT >= {u.release.version}; "
                                              f"no edit makes this adapter mean the same to PEFT {release.version}"))
        return
    if "ADC205" in ids and not any(u.key == "peft_version" for u in unknown):
        saved = ctx.config.get("peft_version")
        out.refusals.append(Refusal("ADC205", f"the adapter was saved by PEFT {saved}, newer than the target "
                                              f"{release.version}, which reads the peft_version field itself: no "
                                              f"config edit helps; load it with PEFT >= {saved}"))
    for u in unknown:
        answers = "ADC202" if u.kind == "future" and not u.at_default else _ANSWERS[u.kind]
        if answers not in ids and u.key == "peft_version" and "ADC205" in ids:
            answers = "ADC205"  # the stamp is dropped for its own finding
        if answers not in ids:
            continue
        value = ctx.config[u.key]
        if u.at_default or u.kind == "foreign" or u.key in init_only:
            why = {"foreign": "no PEFT release defines it", "legacy": f"removed after PEFT {u.release.version if u.release else '?'}"}
            out.edits.append(ConfigEdit(u.key, value, ABSENT, answers,
                                        why.get(u.kind, f"unknown to PEFT {release.version}; its value changes nothing here")))
        else:
            out.refusals.append(Refusal(answers, f"{u.key}={value!r} is not the default: dropping it would change the adapter"))


def _add_peft_type(ctx: FixContext, out: FixerPlan) -> None:
    """The PEFT type whose config class declares every key, with the fewest other fields (LoRA before AdaLoRA)."""
    table, release = peft_table(), ctx.check.target_release
    keys = set(ctx.config)
    fits = sorted((len(f), t) for t in release.peft_types if keys <= (f := set(table.fields(t, release))))
    if not fits or (len(fits) > 1 and fits[0][0] == fits[1][0]):
        out.refusals.append(Refusal("ADC106", "the keys do not identify one PEFT type; add peft_type by hand"))
        return
    out.edits.append(ConfigEdit("peft_type", ABSENT, fits[0][1], "ADC106",
                                f"every key is a {fits[0][1]} field, and no smaller config class has them all"))
