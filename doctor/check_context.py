"""What every check sees: the adapter as read, the environment it is judged against, and the base model."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from . import transformers_renames
from .artifact import Artifact
from .base_model import BaseModel, BaseResolution, layout_is_special, layout_release
from .config_kind import not_peft
from .env import Env
from .knowledge import FieldSpec, Release, has_behaviour, peft_table
from .user_regex import Matcher

_RENAMED_TYPES = {"LORA", "ADALORA"}  # the PEFT types whose modules transformers' renames can strand


@dataclass
class Context:
    artifact: Artifact
    env: Env
    resolution: BaseResolution = field(default_factory=lambda: BaseResolution(None))
    scan_values: bool = True
    matcher: Matcher = field(default_factory=Matcher)  # the config's regexes share one time budget

    def config_file(self, key: str | None = None) -> str:
        return f"{self.artifact.config_path}#/{key}" if key else str(self.artifact.config_path)

    @property
    def base(self) -> BaseModel | None:
        return self.resolution.base

    @property
    def target_release(self) -> Release:
        """The PEFT release the adapter is judged against (the newest known when PEFT is absent)."""
        table = peft_table()
        return table.resolve(self.env.peft) if self.env.peft else table.newest

    @property
    def not_peft(self) -> bool:
        """Another tool's config, or no config PEFT could use: the checks of PEFT weights stand aside."""
        return not_peft(self.artifact.config)

    @property
    def peft_type(self) -> str | None:
        config = self.artifact.config or {}
        value = config.get("peft_type")
        return value if isinstance(value, str) and value in peft_table().all_peft_types() else None

    @property
    def target_fields(self) -> dict[str, FieldSpec]:
        return peft_table().fields(self.peft_type, self.target_release) if self.peft_type else {}

    @cached_property
    def renames(self) -> transformers_renames.RenameVerdict | None:
        """What transformers' module renames do to this adapter (ADC518), judged once for every check."""
        config, base = self.artifact.config, self.base
        mapping = (config or {}).get("auto_mapping")  # PEFT records the base class there when task_type is null
        name = mapping.get("base_model_class") if isinstance(mapping, dict) else None
        model = base.config if base is not None else {"architectures": [name]} if isinstance(name, str) else None
        if model is None or not isinstance(config, dict) or self.peft_type not in _RENAMED_TYPES or layout_is_special(model):
            return None
        converts = has_behaviour("transformers_key_conversion", self.target_release)
        return transformers_renames.verdict(model, config, self.adapter_modules, self.base_names,
                                            layout_release(self.env.transformers), converts, self.matcher)

    @cached_property
    def newer_names(self) -> transformers_renames.NewerNames | None:
        """Adapter modules named as a later transformers builds the base (ADC520): saved on a newer release."""
        config, base, names = self.artifact.config, self.base, self.base_names
        if base is None or not names or not isinstance(config, dict) or self.peft_type not in _RENAMED_TYPES \
                or layout_is_special(base.config):
            return None
        return transformers_renames.newer_names(base.config, config, self.adapter_modules, names,
                                                layout_release(self.env.transformers), self.matcher)

    @cached_property
    def renamed_modules(self) -> frozenset[str]:
        """The adapter modules that ADC518 or ADC520 report as renamed: the other checks leave them to those."""
        found = self.renames.reported if self.renames is not None else frozenset()
        return found | {r.old for r in self.newer_names.renamed} if self.newer_names is not None else found

    @cached_property
    def adapter_modules(self) -> list[str]:
        """The modules the adapter's weights adapt: LoRA pairs and fully saved parameters."""
        return sorted({k.module for k in self.artifact.keys.values()
                       if k.role.startswith("lora_") or (k.role == "full" and k.param)})

    @cached_property
    def base_names(self) -> list[str] | None:
        """The base's module names, fused experts aside; None without a base."""
        base = self.base
        return None if base is None else [n for n, m in base.modules.items() if m.kind != "experts"]
