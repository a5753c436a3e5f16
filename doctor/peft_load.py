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
        kind, ref = ("future", first) if first.parsed > release.parsed else ("legacy", last)
        spec = table.fields(peft_type, ref).get(key)
        # A version stamp changes nothing when dropped, whatever its value.
        harmless = key in config_fields()["metadata"] or spec is not None and same_value(value, spec.default)
        out.append(UnknownKey(key, kind, harmless, ref))
    return out


def predict(config: dict | None, problem: ConfigProblem | None, release: Release) -> LoadPrediction:
    """What `release` does when `PeftModel.from_pretrained` reads this config."""
    table = peft_table()
    if problem is not None or config is None:
        return LoadPrediction("raises", "JSONDecodeError: the file is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is None:
        return _missing_peft_type(release)
    if not isinstance(peft_type, str) or peft_type not in release.peft_types:
        return LoadPrediction("raises", f"KeyError: {peft_type!r}")
    task_type = config.get("task_type")
    if release.task_type_validated and task_type is not None and task_type not in release.task_types:
        return LoadPrediction("raises", f"ValueError: Invalid task type: {task_type!r}")
    unknown = tuple(classify_unknown(config, peft_type, release, table))
    if not unknown:
        return LoadPrediction("loads")
    if release.unknown_keys == "raise":
        cls = table.config_class(peft_type) or "PeftConfig"
        return LoadPrediction("raises", f"TypeError: {cls}.__init__() got an unexpected keyword argument '{unknown[0].key}'", unknown)
    if release.unknown_keys == "warn":
        return LoadPrediction("warns", None, unknown)
    return LoadPrediction("loads", None, unknown)  # silently ignored


def _missing_peft_type(release: Release) -> LoadPrediction:
    if release.peft_type_required == "typeerror":
        return LoadPrediction("raises", "TypeError: the config is missing required keys: {'peft_type'}")
    return LoadPrediction("raises", "KeyError: 'peft_type'")
