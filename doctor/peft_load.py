"""Predict what a PEFT release does when it loads an adapter_config.json, from the knowledge table alone.

This is the model behind the config-version checks: which keys a release accepts, which it drops,
and whether it raises, warns, or silently ignores. Tests hold it against outcomes measured with the
real releases.
"""
from __future__ import annotations

from dataclasses import dataclass

from .artifact import ConfigProblem
from .knowledge import MISSING, FieldSpec, PeftTable, Release, config_fields, peft_table


@dataclass(frozen=True)
class UnknownKey:
    key: str
    kind: str  # "future" (a later release adds it), "legacy" (a release before removed it), "foreign" (never PEFT's)
    at_default: bool
    release: Release | None  # future: first release with it; legacy: last release with it


@dataclass(frozen=True)
class LoadPrediction:
    outcome: str  # "loads", "warns" or "raises"
    error: str | None = None  # "<Exception>: <message>" when it raises
    unknown: tuple[UnknownKey, ...] = ()

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(u.key for u in self.unknown) if self.outcome != "raises" else ()


def accepted_fields(table: PeftTable, peft_type: str, release: Release) -> dict[str, FieldSpec]:
    return {n: f for n, f in table.fields(peft_type, release).items() if f.init}


def same_value(value: object, default: object) -> bool:
    if default is MISSING:
        return False
    if isinstance(default, dict) and "$expr" in default:
        # A computed default: only "nothing set" values can be told apart from it.
        return value in (None, {}, [], False)
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, list) and isinstance(default, list):
        return sorted(map(repr, value)) == sorted(map(repr, default))
    return value == default


def classify_unknown(config: dict, peft_type: str, release: Release, table: PeftTable | None = None) -> list[UnknownKey]:
    """Keys of `config` that `release`'s config class does not accept, in file order."""
    table = table or peft_table()
    accepted = accepted_fields(table, peft_type, release)
    out = []
    for key, value in config.items():
        if key in accepted:
            continue
        first = table.first_release_with(peft_type, key)
        last = table.last_release_with(peft_type, key)
        if first is None:
            out.append(UnknownKey(key, "foreign", False, None))
            continue
        kind, ref = ("future", first) if first.parsed > release.parsed else ("legacy", last or first)
        spec = table.fields(peft_type, ref).get(key)
        # A version stamp changes nothing when dropped, whatever its value.
        harmless = key in config_fields()["metadata"] or spec is not None and same_value(value, spec.default)
        out.append(UnknownKey(key, kind, harmless, ref))
    return out


def predict(config: dict | None, problem: ConfigProblem | None, release: Release, typed: bool = True) -> LoadPrediction:
    """What `release` does when it reads this config.

    typed=True: the config `PeftModel.from_pretrained` builds (the class peft_type names).
    typed=False: what `PeftConfig.from_pretrained` returns, which releases before 0.5 build as the base class.
    """
    table = peft_table()
    if problem is not None or config is None:
        return LoadPrediction("raises", "JSONDecodeError: the file is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is None and typed:
        return LoadPrediction("raises", "KeyError: 'peft_type'")
    if peft_type is None or not (typed or release.dispatches):
        return _untyped(config, release, table)
    if not isinstance(peft_type, str) or peft_type not in release.peft_types:
        return LoadPrediction("raises", f"KeyError: {peft_type!r}")
    task_type = config.get("task_type")
    if release.task_type_validated and task_type is not None and task_type not in release.task_types:
        return LoadPrediction("raises", f"ValueError: Invalid task type: {task_type!r}")
    unknown = tuple(classify_unknown(config, peft_type, release, table))
    if unknown and release.unknown_keys == "raise":
        cls = table.config_class(peft_type) or "PeftConfig"
        return LoadPrediction("raises", f"TypeError: {cls}.__init__() got an unexpected keyword argument '{unknown[0].key}'", unknown)
    if unknown and release.unknown_keys == "warn" and release.filters_by_caller and not typed:
        # The retry keeps only PeftConfig's own fields: r, lora_alpha, ... fall back to their defaults, so
        # only values other than the default are lost.
        base, own = table.base_fields(release), accepted_fields(table, peft_type, release)
        lost = [k for k in config if k not in base and not (k in own and same_value(config[k], own[k].default))]
        return LoadPrediction("warns", None, tuple(UnknownKey(k, "foreign", False, None) for k in lost))
    warned = (unknown and release.unknown_keys == "warn") or bool(value_warnings(config, peft_type, release))
    return LoadPrediction("warns" if warned else "loads", None, unknown)


_COMPARE = {"!=": lambda a, b: a != b, "==": lambda a, b: a == b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
            "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}


def value_warnings(config: dict, peft_type: str, release: Release) -> list[str]:
    """The warnings a release's config class emits for these values (e.g. AdaLoRA ignoring `r`)."""
    out = []
    for rule in release.value_warnings.get(peft_type, []):
        if rule["field"] in config:
            try:
                if _COMPARE[rule["op"]](config[rule["field"]], rule["value"]):
                    out.append(rule["message"])
            except TypeError:  # an ordering test on a value of the wrong type raises in PEFT too
                continue
    return out


def _untyped(config: dict, release: Release, table: PeftTable) -> LoadPrediction:
    """Without peft_type, PeftConfig.from_pretrained builds the base class from the file."""
    base = table.base_fields(release)
    extra = tuple(UnknownKey(k, "foreign", False, None) for k in config if k not in base)
    if release.unknown_keys == "ignore":
        return LoadPrediction("loads", None, extra)  # setattr only for attributes PeftConfig has
    if release.unknown_keys == "raise" and extra:
        return LoadPrediction("raises", f"TypeError: PeftConfig.__init__() got an unexpected keyword argument '{extra[0].key}'")
    if release.unknown_keys == "raise":
        return LoadPrediction("loads")
    return LoadPrediction("raises", "TypeError: the config is missing required keys: {'peft_type'}")


def safetensors_strands(config: dict, peft_type: str | None, target: Release, table: PeftTable | None = None) -> str | None:
    """Why converting the adapter's weights to adapter_model.safetensors would leave it unloadable, or None.

    Releases before the first that reads safetensors look for adapter_model.bin only. A legacy key with a
    non-default value (the enable_lora layout of PEFT 0.2) binds the adapter to the releases that declare it;
    when all of those predate safetensors, no release could load the converted adapter."""
    table = table or peft_table()
    first = table.first_reading_safetensors()
    if first is None:
        return "no known PEFT release reads adapter_model.safetensors"
    if not target.reads_safetensors:
        return f"PEFT {target.version} reads only adapter_model.bin (adapter_model.safetensors from PEFT {first.version})"
    if peft_type is None:
        return None
    free = set(config_fields()["init_only"]) | set(config_fields()["metadata"])
    bound = [(u.release, u.key) for u in classify_unknown(config, peft_type, table.newest, table)
             if u.kind == "legacy" and not u.at_default and u.key not in free and u.release is not None]
    if not bound:
        return None
    last, key = min(bound, key=lambda b: b[0].parsed)
    if last.parsed >= first.parsed:
        return None
    return (f"{key}={config[key]!r} is read only by PEFT <= {last.version}, which loads only "
            f"adapter_model.bin (adapter_model.safetensors from PEFT {first.version}); converted, no release "
            "would load this adapter")
