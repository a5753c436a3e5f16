"""The facts an MoE layout conversion needs: the architecture's module names in transformers 4's per-expert
layout and 5's fused one (from the architecture table), the base's expert sizes, and what PEFT's LoRA on fused
expert parameters cannot carry."""
from __future__ import annotations

from dataclasses import dataclass

from adapter_doctor.base_model import arch_facts, expert_dims, expert_regex, family_of
from adapter_doctor.user_regex import pathological_keys

_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "lora_bias", "fan_in_fan_out": "fan_in_fan_out",
                "velora_config": "VeLoRA", "kasa_config": "KaSA"}  # PEFT's ParamWrapper rejects each of these


class LayoutRefusal(Exception):
    """The adapter cannot change layout without changing what it computes."""


@dataclass(frozen=True)
class ExpertLayout:
    """The architecture's module names in both layouts, and the base's expert sizes."""

    per_expert: str  # "block_sparse_moe.experts.{e}."
    fused: str  # "mlp.experts."
    fused_params: dict[str, str]  # role ("gate_up", "down") -> fused parameter, in nesting order
    gate: str
    up: str
    down: str
    router_per_expert: str  # the router module in transformers 4
    router_fused: str  # and in 5, where it is a 2-D parameter of that name + ".weight"
    names_unique: bool  # the per-expert leaf names occur nowhere else in the model
    experts: int
    hidden: int
    intermediate: int

    def projections(self, role: str) -> list[str]:
        return [self.gate, self.up] if role == "gate_up" else [self.down]

    def dims(self, what: str) -> tuple[int, int]:
        """(in, out) of a per-expert projection or a fused role."""
        if what in (self.gate, self.up):
            return self.hidden, self.intermediate
        if what == "gate_up":
            return self.hidden, 2 * self.intermediate
        return self.intermediate, self.hidden  # down, either way

    def expert_regex(self, index: str) -> str:
        return expert_regex(self.per_expert, index)

    def fused_name(self, role: str) -> str:
        return self.fused + self.fused_params[role]


def expert_layout(config: dict, base_config: dict) -> ExpertLayout:
    """The layout of the adapter's base, or LayoutRefusal when the adapter or the base cannot change layout."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LayoutRefusal(f"only LoRA has a fused expert layout, not {config.get('peft_type')!r}")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise LayoutRefusal(f"{what}: PEFT's LoRA on fused expert parameters (ParamWrapper) has no equivalent")
    for name in ("rank_pattern", "alpha_pattern"):  # their keys are run as regexes below: bound them first
        bad = pathological_keys(config.get(name))
        if bad:
            raise LayoutRefusal(f"{name} key {bad[0][0][:60]!r}: {bad[0][1]}; it is not run")
    nested = base_config.get("text_config")
    text = nested if isinstance(nested, dict) else base_config
    model_type = text.get("model_type", base_config.get("model_type"))
    facts = arch_facts()["moe"]["layouts"].get(family_of(model_type) or "")
    if facts is None or facts.get("gate_up_split") != "gate_then_up":
        raise LayoutRefusal(f"no per-expert/fused expert layout is known for model_type {model_type!r}")
    sizes = expert_dims(base_config)
    if sizes is None:
        raise LayoutRefusal("the base config does not give the number of experts and their sizes")
    gate, up = facts["gate_up"]
    return ExpertLayout(facts["per_expert"], facts["fused"], facts["fused_params"], gate, up, facts["down"],
                        facts["router"][0], facts["router"][1], facts["expert_names_unique"], *sizes)
