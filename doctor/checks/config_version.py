"""config-version: will the target PEFT release read this config, and read all of it?"""
from __future__ import annotations

from typing import Iterator

from ..annotations import fits
from ..finding import Finding, Fix, Severity
from ..knowledge import config_fields, parse_version, peft_table
from ..peft_load import UnknownKey, classify_unknown, predict
from . import Check, Context, register, runner

CAT = "config-version"
UNKNOWN_DEFAULT = Check(
    "ADC201", CAT, Severity.INFO, "Keys the target PEFT does not know, all at their defaults",
    "PEFT writes every field of its config class, including defaults, so an adapter saved by a newer PEFT carries "
    "keys an older one does not know. PEFT 0.6 to 0.13 raise `TypeError: LoraConfig.__init__() got an unexpected "
    "keyword argument` (naming only the first); 0.14 and later drop them with a UserWarning; 0.2 and 0.3 ignore them "
    "silently. Keys still at their default value are safe to drop.",
    fixer="migrate-config")
FEATURE_MISSING = Check(
    "ADC202", CAT, Severity.ERROR, "Uses a feature the target PEFT does not have",
    "A key the target release does not know holds a non-default value: the adapter relies on a feature (DoRA, "
    "rsLoRA, target_parameters, trainable tokens, ...) that release lacks. Older releases raise TypeError; 0.14+ "
    "drop the key with a warning and load a silently different or partial adapter. Dropping it by hand is wrong.",
    manual="Load it with a PEFT release that has the feature (see the message for the minimum).")
LEGACY = Check(
    "ADC203", CAT, Severity.ERROR, "Legacy keys that newer PEFT releases removed",
    "PEFT 0.1/0.2 configs carry `enable_lora` and `merge_weights`, which 0.3 removed. 0.3 to 0.13 raise TypeError "
    "on them; 0.14+ drop them with a warning, which is harmless unless enable_lora holds a list.",
    fixer="migrate-config")
FOREIGN_KEYS = Check(
    "ADC204", CAT, Severity.INFO, "Keys no PEFT release defines",
    "Another tool added keys to the config. PEFT 0.6 to 0.13 raise TypeError on them; later releases drop them "
    "with a warning. PEFT never used them, so removing them is safe.",
    fixer="migrate-config")
STAMP_NEWER = Check(
    "ADC205", CAT, Severity.WARNING, "Saved by a newer PEFT than the target",
    "Since 0.18, PEFT stamps `peft_version` into the config. An adapter saved by a newer release may use formats "
    "the target does not read. Where the target predates the stamp, the fix drops it with the other unknown keys.",
    fixer="migrate-config")
ERA = Check(
    "ADC206", CAT, Severity.INFO, "PEFT version inferred from the config's keys",
    "Configs saved before PEFT 0.18 carry no version stamp. Because PEFT writes every field, the key set tells which "
    "releases could have written the file; a trimmed key set (Unsloth removes defaults) tells nothing.")
TASK_TYPE = Check(
    "ADC207", CAT, Severity.ERROR, "task_type unknown to the target PEFT",
    "From 0.14, PEFT rejects an unknown task_type with `ValueError: Invalid task type`; older releases accept it and "
    "fall back to the plain PeftModel class.", manual="Set task_type to one PEFT knows (CAUSAL_LM, SEQ_CLS, ...) or null.")
TARGET = Check(
    "ADC208", CAT, Severity.INFO, "Which PEFT release the adapter was judged against",
    "Version checks use the installed PEFT, or `--target-peft`. Without either they use the newest release in the "
    "knowledge table.")
METHOD_MISSING = Check(
    "ADC209", CAT, Severity.ERROR, "The target PEFT does not have this peft_type",
    "Each release maps peft_type to a config class; a type it lacks raises `KeyError` before anything loads. Some "
    "methods were removed: BONE went in 0.19, replaced by MiSS, which keeps its block layout (`bone_block` is "
    "`miss_block`).", manual="Load it with a PEFT release that has the method (see the message).")
register(UNKNOWN_DEFAULT, FEATURE_MISSING, LEGACY, FOREIGN_KEYS, STAMP_NEWER, ERA, TASK_TYPE, TARGET, METHOD_MISSING)
# What replaced a removed method, where its saved layout carries over unchanged (checked by reloads: tests/doctor/checks/test_precision.py)
SUCCESSORS = {"BONE": "MISS"}

@runner
def check(ctx: Context) -> Iterator[Finding]:
    release = ctx.target_release
    yield from _target_note(ctx)
    peft_type, config = ctx.peft_type, ctx.artifact.config
    if peft_type is None or config is None:
        return
    if peft_type not in release.peft_types:
        yield _method_missing(ctx, peft_type, release)
        return
    unknown = classify_unknown(config, peft_type, release)
    first_error = predict(config, None, release).error
    yield from _unknown_findings(ctx, unknown, release.version, release.unknown_keys, first_error)
    yield from _new_values(ctx, config, peft_type, release)
    yield from _task_type(ctx, config, release)
    yield from _stamp(ctx, config, peft_type, release.version)


def _target_note(ctx: Context) -> Iterator[Finding]:
    table, env = peft_table(), ctx.env
    if env.peft_source == "none":
        msg = f"PEFT is not installed here; judged against PEFT {table.newest.version}, the newest known. Use --target-peft."
    elif parse_version(env.peft) is None:
        msg = f"--target-peft {env.peft!r} is not a version; judged against PEFT {table.newest.version}"
    elif parse_version(env.peft) > table.newest.parsed:
        msg = (f"PEFT {env.peft} is newer than the knowledge table (newest {table.newest.version}); "
               "fields added since are unknown to doctor")
    else:
        where = "installed" if env.peft_source == "installed" else "from --target-peft"
        release = ctx.target_release
        same = "" if release.version == env.peft.split("@")[0] else f", which behaves as {release.version}"
        msg = f"judged against PEFT {env.peft} ({where}{same})"
    yield TARGET.finding(msg, ctx.config_file())


def _consequence(mode: str, target: str, error: str | None) -> str:
    if mode == "raise":
        return f"PEFT {target} raises `{error}`"
    if mode == "warn":
        return f"PEFT {target} drops them with a UserWarning"
    return f"PEFT {target} ignores them silently"


def _unknown_findings(ctx: Context, unknown: list[UnknownKey], target: str, mode: str, error: str | None) -> Iterator[Finding]:
    raises = mode == "raise"
    what = _consequence(mode, target, error)
    defaults = [u for u in unknown if u.kind == "future" and u.at_default]
    if defaults:
        keys = ", ".join(u.key for u in defaults)
        yield UNKNOWN_DEFAULT.finding(
            f"{len(defaults)} key(s) unknown to PEFT {target}, all at their default value: {keys}. {what}; "
            "dropping them is harmless.",
            ctx.config_file(defaults[0].key), severity=Severity.ERROR if raises else Severity.INFO)
    for u in unknown:
        if u.kind == "future" and not u.at_default:
            yield _feature_finding(ctx, u, target, mode, what)
    legacy = [u for u in unknown if u.kind == "legacy"]
    if legacy:
        keys = ", ".join(f"{u.key}={ctx.artifact.config[u.key]!r}" for u in legacy)
        last = legacy[0].release.version if legacy[0].release else "?"
        layout = config_fields()["layout"]
        marked = [u for u in legacy if u.key in layout and not u.at_default]
        if marked:
            yield LEGACY.finding(f"{keys}: {marked[0].key} marks {layout[marked[0].key]}. Dropping the key would not help.",
                                 ctx.config_file(marked[0].key), fix=Fix(None, f"Load it with PEFT {last}, or retrain"))
        else:
            yield LEGACY.finding(f"{keys}: last accepted by PEFT {last}. {what}.", ctx.config_file(legacy[0].key),
                                 severity=Severity.ERROR if raises else Severity.INFO)
    foreign = [u for u in unknown if u.kind == "foreign"]
    if foreign:
        keys = ", ".join(u.key for u in foreign)
        yield FOREIGN_KEYS.finding(f"{keys}: not a {ctx.peft_type} field in any PEFT release. {what}.",
                                   ctx.config_file(foreign[0].key), severity=Severity.ERROR if raises else Severity.INFO)


def _feature_finding(ctx: Context, u: UnknownKey, target: str, mode: str, what: str) -> Finding:
    value = ctx.artifact.config[u.key]
    since = u.release.version if u.release else "?"
    feature = config_fields()["features"].get(u.key, u.key)
    if u.key in config_fields()["init_only"]:
        return FEATURE_MISSING.finding(
            f"{u.key}={value!r} needs PEFT >= {since}. {what}; it only steered initialisation, so the trained "
            "weights still load the same.",
            ctx.config_file(u.key), severity=Severity.ERROR if mode == "raise" else Severity.INFO,
            title=f"{u.key} is unknown to PEFT {target} (initialisation only)", fix=Fix("migrate-config", "drop the key"))
    effect = "" if mode == "raise" else "; the adapter then loads without it and computes something else"
    return FEATURE_MISSING.finding(
        f"{u.key}={value!r} ({feature}) needs PEFT >= {since}. {what}{effect}.",
        ctx.config_file(u.key), title=f"Uses {feature}, which PEFT {target} does not have",
        fix=Fix(None, f"pip install -U 'peft>={since}'"))


def _task_type(ctx: Context, config: dict, release) -> Iterator[Finding]:
    task_type = config.get("task_type")
    if task_type is None or task_type in release.task_types:
        return
    known = ", ".join(release.task_types)
    if release.task_type_validated:
        yield TASK_TYPE.finding(f"task_type {task_type!r}: PEFT {release.version} raises `ValueError: Invalid task type` "
                                f"(it knows {known})", ctx.config_file("task_type"))
    else:
        yield TASK_TYPE.finding(f"task_type {task_type!r} is unknown to PEFT {release.version}, which loads it as a "
                                "plain PeftModel; PEFT 0.14+ rejects it", ctx.config_file("task_type"),
                                severity=Severity.WARNING)


def _stamp(ctx: Context, config: dict, peft_type: str, target: str) -> Iterator[Finding]:
    stamp = config.get("peft_version")
    if isinstance(stamp, str):
        saved = parse_version(stamp)
        if saved is not None and saved > parse_version(target):
            # A target that reads the stamp itself keeps it: no config edit helps, a newer PEFT does.
            fix = Fix(None, f"Load it with PEFT >= {saved}: pip install -U 'peft>={saved}'") \
                if "peft_version" in ctx.target_fields else None
            yield STAMP_NEWER.finding(f"saved by PEFT {stamp}; the target is {target}", ctx.config_file("peft_version"),
                                      fix=fix)
        return
    yield ERA.finding(_era_message(config, peft_type, ctx.artifact.model_card), ctx.config_file())


def _era_message(config: dict, peft_type: str, card: dict | None) -> str:
    table = peft_table()
    keys = set(config)
    exact, superset = [], []
    for release in table.releases_with_peft_type(peft_type):
        written = set(table.fields(peft_type, release)) - {"runtime_config"}
        if keys == written:
            exact.append(release.version)
        elif keys < written:
            superset.append(release.version)
    hint = f"; its model card names PEFT {card['_peft_version']}" if card and card.get("_peft_version") else ""
    if exact:
        span = exact[0] if len(exact) == 1 else f"{exact[0]} to {exact[-1]}"
        return f"no peft_version stamp; its keys are exactly those PEFT {span} writes{hint}"
    if superset:
        return (f"no peft_version stamp, and {len(keys)} keys where PEFT writes every field: the config was trimmed "
                f"(Unsloth and some trainers do this), so no release can be inferred{hint}")
    return f"no peft_version stamp, and no PEFT release writes this key set{hint}"


def _method_missing(ctx: Context, peft_type: str, release) -> Finding:
    having = peft_table().releases_with_peft_type(peft_type)
    if having and having[-1].parsed < release.parsed:
        successor = SUCCESSORS.get(peft_type)
        instead = f"; {successor} replaces it" if successor in release.peft_types else ""
        return METHOD_MISSING.finding(
            f"peft_type {peft_type} was removed after PEFT {having[-1].version}{instead}: PEFT {release.version} "
            f"raises `KeyError: '{peft_type}'`", ctx.config_file("peft_type"),
            title=f"PEFT {release.version} no longer has {peft_type}",
            fix=Fix("bone-to-miss", f"doctor fix --only {METHOD_MISSING.id}") if peft_type == "BONE" and instead
            else Fix(None, f"pip install 'peft=={having[-1].version}', or retrain with {successor or 'another method'}"))
    since = having[0].version  # ctx.peft_type is one some release has
    return METHOD_MISSING.finding(f"peft_type {peft_type} needs PEFT >= {since}: PEFT {release.version} raises "
                                  f"`KeyError: '{peft_type}'`", ctx.config_file("peft_type"),
                                  fix=Fix(None, f"pip install -U 'peft>={since}'"))


# What a release does with a value its annotation does not admit, where a later release added that value.
INIT_EFFECTS = {"raise": "raises `ValueError: Unknown initialization` when it builds the LoRA layers",
                "as-true": "reads it as True (the default init), so the method's meaning is lost without a word"}
UNKNOWN_EFFECT = "has no such initialization, so it ignores or rejects it"  # an effect the table names and this does not


def _new_values(ctx: Context, config: dict, peft_type: str, release) -> Iterator[Finding]:
    table = peft_table()
    target = ctx.target_fields
    for key, value in config.items():
        spec = target.get(key)
        if key == "init_lora_weights" and peft_type == "LORA" and isinstance(value, str):
            if release.understands_init(value):
                continue
            later = [r for r in table.releases if r.parsed > release.parsed and r.understands_init(value)]
            effect = INIT_EFFECTS.get((release.lora_init_values or {}).get("other_strings", "as-true"), UNKNOWN_EFFECT)
        elif spec is None or not spec.annotation or fits(value, spec.annotation) or value is None and spec.default is None:
            continue
        else:
            later = [r for r in table.releases if r.parsed > release.parsed
                     and (s := table.fields(peft_type, r).get(key)) is not None and fits(value, s.annotation)]
            effect = "reads a value it has no meaning for"
        if not later:
            continue  # a value no release admits: ADC108
        yield FEATURE_MISSING.finding(
            f"{key}={value!r} is a value PEFT {later[0].version} added; PEFT {release.version} {effect}.",
            ctx.config_file(key), title=f"{key}={value!r} is unknown to PEFT {release.version}",
            fix=Fix(None, f"pip install -U 'peft>={later[0].version}'"))
