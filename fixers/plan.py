"""What a fix will do, decided before anything is written: config edits, tensor changes, refusals."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from adapter_doctor.finding import Finding

ABSENT = object()  # a config key that is not there (before) or is removed (after)


def _shown(value: object) -> str:
    return "(absent)" if value is ABSENT else repr(value)


@dataclass(frozen=True)
class ConfigEdit:
    key: str
    before: object
    after: object
    finding: str  # the check id this edit answers
    reason: str

    def shown(self) -> tuple[str, str]:
        """The values before and after, as a report prints them."""
        return _shown(self.before), _shown(self.after)


@dataclass(frozen=True)
class TensorChange:
    before: str
    after: str
    what: str  # "rename", "cast F32 -> BF16", "layout", "pickle -> safetensors"
    finding: str


@dataclass(frozen=True)
class Refusal:
    finding: str
    reason: str


@dataclass
class WeightsJob:
    """How the new adapter_model.safetensors is made. Renames alone stream the data through untouched."""

    source: Path
    renames: dict[str, str] = field(default_factory=dict)
    cast: str | None = None  # "BF16" or "F16"
    from_pickle: bool = False
    tensors: dict | None = None  # a whole new tensor set (layout conversions, the MoE swap), renamed like the file's
    metadata: dict[str, str] | None = None  # the source's __metadata__ as planned (provenance), kept with `tensors`

    @property
    def streaming(self) -> bool:
        return not (self.cast or self.from_pickle or self.tensors is not None)


@dataclass
class FixerPlan:
    """One fixer's proposal; `fixers.plan` merges them in registry order."""

    edits: list[ConfigEdit] = field(default_factory=list)
    changes: list[TensorChange] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    renames: dict[str, str] = field(default_factory=dict)
    cast: str | None = None
    from_pickle: bool = False
    tensors: dict | None = None  # a whole new tensor set (layout conversions)
    remove: set[str] = field(default_factory=set)


@dataclass
class Plan:
    target: Path
    config_path: Path
    config_before: dict | None
    config_after: dict | None
    findings: list[Finding]
    edits: list[ConfigEdit] = field(default_factory=list)
    changes: list[TensorChange] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    weights: WeightsJob | None = None
    remove: set[str] = field(default_factory=set)
    fingerprints: dict[str, object] = field(default_factory=dict)

    @property
    def config_only(self) -> bool:
        """A config file under another name, checked and fixed on its own."""
        return self.config_path.name != "adapter_config.json"

    @property
    def empty(self) -> bool:
        return not (self.edits or self.weights or self.remove)

    @property
    def answered(self) -> set[str]:
        return {e.finding for e in self.edits} | {c.finding for c in self.changes}

    def config_text(self, after: bool) -> str:
        config = self.config_after if after else self.config_before
        return "" if config is None else peft_json(config)

    def to_dict(self) -> dict:
        def show(value: object) -> object:
            return "<absent>" if value is ABSENT else value

        return {
            "target": str(self.target),
            "changes_planned": not self.empty,
            "config_edits": [{"key": e.key, "before": show(e.before), "after": show(e.after), "finding": e.finding,
                              "reason": e.reason} for e in self.edits],
            "tensor_changes": [vars(c) for c in self.changes],
            "remove": sorted(self.remove),
            "refusals": [vars(r) for r in self.refusals],
        }


def peft_json(config: dict) -> str:
    """adapter_config.json as PEFT's save_pretrained writes it."""
    return json.dumps(config, indent=2, sort_keys=True)
