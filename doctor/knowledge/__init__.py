"""Facts about PEFT releases, read from the committed table `peft_releases.json`.

`tools/regenerate_peft_table.py` builds that table by parsing every published PEFT wheel. Checks ask questions of
it (which fields does release X accept for LORA, what does X do with an unknown key); no check
hard-codes a version number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from packaging.version import InvalidVersion, Version

_HERE = Path(__file__).parent
MISSING = object()
_version = lru_cache(maxsize=None)(Version)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    default: object  # MISSING when the field has no default
    annotation: str
    init: bool

    @property
    def default_is_literal(self) -> bool:
        return self.default is not MISSING and not (isinstance(self.default, dict) and "$expr" in self.default)


@dataclass(frozen=True)
class Release:
    version: str
    date: str
    unknown_keys: str  # "ignore", "raise" or "warn"
    task_type_validated: bool
    peft_type_required: str | None
    peft_types: tuple[str, ...]
    task_types: tuple[str, ...]
    value_warnings: dict = field(default_factory=dict, compare=False)  # peft_type -> [{field, op, value, message}]
    dispatches: bool = True  # PeftConfig.from_pretrained builds the peft_type's own class (0.5+)
    filters_by_caller: bool = False  # 0.14.0 drops unknown keys by the calling class's fields (PeftConfig's)
    reads_safetensors: bool = True  # loads adapter_model.safetensors (0.4+); before, only adapter_model.bin
    modules_to_save_match: str = "suffix"  # module name endswith an entry (0.3+); "substring" of a parameter name before
    lora_init_values: dict | None = field(default=None, compare=False)  # init_lora_weights strings LoRA acts on

    def understands_init(self, value: str) -> bool:
        """Does LoRA in this release act on init_lora_weights=`value` (not raise, not read it as plain True)?"""
        known = self.lora_init_values or {}
        return value in known.get("equals", ()) or value.lower() in known.get("equals", ()) \
            or value.startswith(tuple(known.get("prefixes", ())))

    @property
    def parsed(self) -> Version:
        return _version(self.version)


class PeftTable:
    def __init__(self, data: dict) -> None:
        # 0.0.x releases had no from_pretrained (unknown_keys is null): nothing saved can target them.
        self.releases = [
            Release(r["version"], r.get("date", ""), r["unknown_keys"], bool(r.get("task_type_validated")),
                    r.get("peft_type_required"), tuple(r.get("peft_types", ())), tuple(r.get("task_types", ())),
                    r.get("value_warnings", {}), r.get("dispatches_on_peft_type", True),
                    r.get("unknown_keys_filter") == "caller", r.get("reads_safetensors", True),
                    r.get("modules_to_save_match") or "suffix", r.get("lora_init_values"))
            for r in data["releases"] if r.get("unknown_keys")
        ]
        self.releases.sort(key=lambda r: r.parsed)
        self.configs: dict[str, dict] = data["configs"]
        self._fields: dict[tuple[str, str], dict[str, FieldSpec]] = {}

    @property
    def newest(self) -> Release:
        return self.releases[-1]

    def resolve(self, version: str) -> Release:
        """The release a version behaves like: itself, or the newest known release not after it."""
        wanted = parse_version(version)
        if wanted is None:
            raise ValueError(f"not a PEFT version: {version!r}")
        older = [r for r in self.releases if r.parsed <= wanted]
        return older[-1] if older else self.releases[0]

    def is_known(self, version: str) -> bool:
        v = parse_version(version)
        return v is not None and any(r.parsed == v for r in self.releases)

    def config_class(self, peft_type: str) -> str | None:
        entry = self.configs.get(peft_type)
        return entry["class"] if entry else None

    def fields(self, peft_type: str, release: Release) -> dict[str, FieldSpec]:
        """Every field the release's config class for `peft_type` declares."""
        key = (peft_type, release.version)
        if key not in self._fields:
            entry = self.configs.get(peft_type, {"fields": {}})
            out = {}
            for name, spans in entry["fields"].items():
                span = self._span_at(spans, release)
                if span is not None:
                    out[name] = FieldSpec(name, span.get("default", MISSING), span.get("annotation", ""), span.get("init", True))
            self._fields[key] = out
        return self._fields[key]

    @staticmethod
    def _span_at(spans: list[dict], release: Release) -> dict | None:
        v = release.parsed
        return next((s for s in spans if _version(s["from"]) <= v <= _version(s["to"])), None)

    def base_fields(self, release: Release) -> set[str]:
        """PeftConfig's own fields: every config class inherits them, so they are what all share."""
        sets = [set(self.fields(t, release)) for t in release.peft_types if t in self.configs]
        return set.intersection(*sets) if sets else set()

    def first_release_with(self, peft_type: str, field: str) -> Release | None:
        spans = self.configs.get(peft_type, {}).get("fields", {}).get(field)
        return next((r for r in self.releases if self._span_at(spans, r)), None) if spans else None

    def last_release_with(self, peft_type: str, field: str) -> Release | None:
        spans = self.configs.get(peft_type, {}).get("fields", {}).get(field)
        return next((r for r in reversed(self.releases) if self._span_at(spans, r)), None) if spans else None

    def first_reading_safetensors(self) -> Release | None:
        return next((r for r in self.releases if r.reads_safetensors), None)

    def releases_with_peft_type(self, peft_type: str) -> list[Release]:
        return [r for r in self.releases if peft_type in r.peft_types]

    def all_peft_types(self) -> set[str]:
        return {t for r in self.releases for t in r.peft_types}


def parse_version(text: str) -> Version | None:
    # PEFT stamps dev installs as "<version>@<commit>" (or "@UNKNOWN").
    try:
        return Version(text.split("@", 1)[0].strip())
    except (InvalidVersion, AttributeError, ValueError):  # ValueError: a release number of 4,301+ digits
        return None


@lru_cache(maxsize=1)
def peft_table() -> PeftTable:
    with open(_HERE / "peft_releases.json", encoding="utf-8") as fh:
        return PeftTable(json.load(fh))


@lru_cache(maxsize=1)
def behaviours() -> dict:
    """PEFT loading behaviours by release, and version requirements between libraries."""
    with open(_HERE / "peft_behaviours.json", encoding="utf-8") as fh:
        return json.load(fh)


def behaviour(name: str) -> dict:
    """A PEFT loading behaviour and the release that introduced it (`since`)."""
    return behaviours()["behaviours"][name]


def has_behaviour(name: str, release: Release) -> bool:
    return release.parsed >= Version(behaviour(name)["since"])


@lru_cache(maxsize=1)
def config_fields() -> dict:
    """What dropping each config key costs: a feature, initialisation only, metadata, or an old weight layout."""
    with open(_HERE / "config_fields.json", encoding="utf-8") as fh:
        return json.load(fh)
