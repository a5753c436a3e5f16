"""Whose config an adapter_config.json is: PEFT's, or another tool's saved under PEFT's file name."""
from __future__ import annotations

# Key sets that identify configs of other tools.
FOREIGN = (
    ({"lora_parameters", "fine_tune_type"}, "an MLX (mlx-lm) fine-tuning config"),
    ({"lora_parameters", "lora_layers"}, "an MLX (mlx-lm) fine-tuning config"),
    ({"adapter_path", "iters"}, "an MLX (mlx-lm) fine-tuning config"),
    ({"config", "model_class"}, "an AdapterHub (adapters / adapter-transformers) adapter config"),
    ({"config", "hidden_size", "model_name"}, "an AdapterHub (adapters / adapter-transformers) adapter config"),
)
LORA_HINT_KEYS = {"r", "lora_alpha", "target_modules", "lora_dropout"}


def foreign_tool(config: dict) -> tuple[set[str], str] | None:
    """(the identifying keys, what it is) when `config` is another tool's, by its keys."""
    return next(((keys, what) for keys, what in FOREIGN if keys <= config.keys()), None)


def not_peft(config: object) -> bool:
    """Whether a config without `peft_type` is no PEFT config at all: another tool's, or one with fewer than
    two of LoRA's fields (with two or more it is a PEFT LoRA config missing its type, which can be fixed)."""
    if not isinstance(config, dict) or config.get("peft_type") is not None:
        return False
    return foreign_tool(config) is not None or len(LORA_HINT_KEYS & config.keys()) < 2
