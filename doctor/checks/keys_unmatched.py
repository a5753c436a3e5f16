"""keys-unmatched: adapter weights that will not land where they should, so part or all of it is lost."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterator

from ..adapter_keys import AdapterKey, module_selected, parameter_selected, parse_key
from ..base_model import BaseModel, arch_facts, family_of
from ..finding import Finding, Severity
from ..knowledge import behaviour, has_behaviour
from . import Check, Context, register, runner

CAT = "keys-unmatched"
UNPAIRED = Check(
    "ADC511", CAT, Severity.ERROR, "lora_A without lora_B (or the reverse)",
    "Each LoRA module needs both halves. With one missing, PEFT keeps that half at its initial value: lora_B "
    "starts at zero, so the module does nothing; a missing lora_A pairs trained B with random A.",
    manual="Re-save the adapter from the training run; a half cannot be recovered.")
UNTARGETED = Check(
    "ADC512", CAT, Severity.ERROR, "Weights for modules the config does not select",
    "PEFT only creates LoRA layers for modules matched by target_modules (and full copies for modules_to_save). "
    "Weights for other modules are unexpected keys, which PEFT drops without a word.",
    manual="Add the modules to target_modules (or modules_to_save) in adapter_config.json, as in training.")
TARGET_NOT_IN_BASE = Check(
    "ADC513", CAT, Severity.ERROR, "target_modules names modules the base does not have",
    "When no target matches, PEFT raises `ValueError: Target modules {...} not found in the base model`. Regexes or "
    "full paths written for another architecture or transformers version are the usual cause.",
    manual="Correct target_modules for this base.")
KEYS_NOT_IN_BASE = Check(
    "ADC514", CAT, Severity.ERROR, "Adapter weights for modules the base does not have",
    "The adapter's module paths do not exist in the base as the target transformers builds it. Typical causes: "
    "transformers 4.52 moved VLM decoders under `model.language_model`; transformers 5 fused MoE experts into "
    "3-D parameters. PEFT loads such weights nowhere, so the adapter is partly or wholly a no-op.",
    fixer="migrate-layout")
NO_WEIGHTS = Check(
    "ADC515", CAT, Severity.WARNING, "Targeted modules without weights",
    "The config targets modules for which the file has no weights. PEFT creates those LoRA layers with lora_B = 0, so "
    "they do nothing; PEFT 0.14+ warns `Found missing adapter keys`.",
    manual="Re-save from training, or narrow target_modules to what was trained.")
register(UNPAIRED, UNTARGETED, TARGET_NOT_IN_BASE, KEYS_NOT_IN_BASE, NO_WEIGHTS)

LORA_TYPES = {"LORA", "ADALORA"}
_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "shared")
# PeftModelFor<Task> adds its head to modules_to_save on its own (peft_model.py).
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


def _saved_whole(module: str, config: dict) -> bool:
    """Is `module` (or a module containing it) wrapped by modules_to_save, explicitly or by the task head?"""
    saved = list(config.get("modules_to_save") or []) + TASK_HEADS.get(config.get("task_type"), [])
    parts = module.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return any(isinstance(s, str) and any(a == s or a.endswith("." + s) for a in ancestors) for s in saved)


@runner
def check(ctx: Context) -> Iterator[Finding]:
    tensors, config = ctx.artifact.tensors, ctx.artifact.config
    if not tensors or config is None or ctx.peft_type not in LORA_TYPES:
        return
    where = str(ctx.artifact.primary_weights.path)
    keys = [parse_key(n) for n in tensors]
    yield from _unpaired(keys, where)
    yield from _untargeted(ctx, config, keys, where)
    if ctx.base is not None and ctx.base.modules:
        yield from _against_base(ctx, config, keys, where, ctx.base)
    else:
        yield from _targets_without_weights(ctx, config, keys)


def _unpaired(keys: list[AdapterKey], where: str) -> Iterator[Finding]:
    roles: dict[str, set[str]] = defaultdict(set)
    for k in keys:
        roles[k.module].add(k.role)
    for a, b in _PAIRS:
        lonely = sorted(m for m, r in roles.items() if (a in r) != (b in r))
        if lonely:
            have = a if a in roles[lonely[0]] else b
            missing = b if have == a else a
            yield UNPAIRED.finding(f"{len(lonely)} module(s) have {have} but no {missing}, e.g. {lonely[0]}",
                                   f"{where}#{lonely[0]}", title=f"{have} without {missing}")


def _layer_ok(module: str, config: dict) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None:
        return True
    wanted = {layers} if isinstance(layers, int) else set(layers) if isinstance(layers, list) else None
    m = _LAYER_INDEX.search(module)
    return wanted is None or m is None or int(m.group(1)) in wanted


def _selected(k: AdapterKey, config: dict) -> bool | None:
    if k.role in ("prompt", "tokens"):
        return True
    excluded = module_selected(k.module, config.get("exclude_modules"))
    if excluded:
        return False
    if k.role == "full":
        if _saved_whole(k.module, config):
            return True
        if k.module.rsplit(".", 1)[-1] in _EMBEDDING_NAMES:
            return True  # PEFT saves resized or targeted embeddings in full
        if k.param == "bias" and config.get("bias") in ("all", "lora_only"):
            return True
    if k.role != "full" and parameter_selected(k.module, config.get("target_parameters")):
        return True
    hit = module_selected(k.module, config.get("target_modules"))
    return hit if hit is None else hit and _layer_ok(k.module, config)


def _untargeted(ctx: Context, config: dict, keys: list[AdapterKey], where: str) -> Iterator[Finding]:
    stray = sorted({k.module for k in keys if _selected(k, config) is False})
    if stray:
        names = sorted({m.rsplit(".", 1)[-1] for m in stray})
        yield UNTARGETED.finding(
            f"{len(stray)} module(s) have weights but are not selected by target_modules/modules_to_save "
            f"({', '.join(names)}), e.g. {stray[0]}; PEFT will drop them silently", f"{where}#{stray[0]}")


def _targets_without_weights(ctx: Context, config: dict, keys: list[AdapterKey]) -> Iterator[Finding]:
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not keys:
        return
    lora_modules = {k.module for k in keys if k.role.startswith("lora_")}
    unused = [t for t in targets if isinstance(t, str) and not any(m == t or m.endswith("." + t) for m in lora_modules)]
    if unused and lora_modules:
        yield NO_WEIGHTS.finding(
            f"target_modules lists {', '.join(unused)} but the file has no LoRA weights for them; if the base has such "
            "modules, they load untrained (pass --base to know)", ctx.config_file("target_modules"), severity=Severity.INFO)


def _against_base(ctx: Context, config: dict, keys: list[AdapterKey], where: str, base: BaseModel) -> Iterator[Finding]:
    modules = base.modules
    adapter_modules = sorted({k.module for k in keys if k.role.startswith("lora_") or (k.role == "full" and k.param)})
    missing = [m for m in adapter_modules if m not in modules]
    if missing:
        cause, severity = _drift(missing[0], base, ctx)
        share = "all" if len(missing) == len(adapter_modules) else f"{len(missing)} of {len(adapter_modules)}"
        yield KEYS_NOT_IN_BASE.finding(
            f"{share} adapter modules are not in the base at {base.path}, e.g. {missing[0]}. {cause}",
            f"{where}#{missing[0]}", severity=severity)
    targets = config.get("target_modules")
    if not isinstance(targets, (list, str)) or targets == "all-linear":
        return
    matched = [m for m, mod in modules.items() if mod.kind != "experts" and module_selected(m, targets)]
    if not matched and not config.get("target_parameters"):
        yield TARGET_NOT_IN_BASE.finding(
            f"no module of the base at {base.path} matches target_modules={targets!r}: PEFT raises "
            "`ValueError: Target modules ... not found in the base model`", ctx.config_file("target_modules"))
        return
    trained = {k.module for k in keys if k.role.startswith("lora_")}
    untrained = [m for m in matched if m not in trained and _layer_ok(m, config)]
    if untrained and trained and not missing:  # with path drift, the finding above already explains the gap
        yield NO_WEIGHTS.finding(
            f"{len(untrained)} of {len(matched)} base modules selected by target_modules have no weights in the file, "
            f"e.g. {untrained[0]}; they load with lora_B = 0", ctx.config_file("target_modules"))


def _drift(module: str, base: BaseModel, ctx: Context) -> tuple[str, Severity]:
    facts = arch_facts()
    for old, new in facts["vlm"]["renames"]:
        for src, dst in ((old, new), (new, old)):
            if module.startswith(src) and dst + module[len(src):] in base.modules:
                return _vlm_drift(src, dst, dst + module[len(src):], ctx)
    layout = facts["moe"]["layouts"].get(family_of(base.model_type) or "")
    if layout:
        per_expert = re.escape(layout["per_expert"]).replace(r"\{e\}", r"\d+")
        if re.search(per_expert, module + "."):
            fused = re.sub(per_expert + r".*$", layout["fused"], module + ".").rstrip(".")
            if fused in base.modules:
                return _moe_drift(base, ctx)
        if module.endswith(layout["fused"].rstrip(".")):
            return ("The adapter targets fused MoE experts (transformers 5 layout), but the base has per-expert "
                    "modules (transformers 4).", Severity.ERROR)
    return "PEFT loads these weights nowhere.", Severity.ERROR


def _vlm_drift(src: str, dst: str, runtime: str, ctx: Context) -> tuple[str, Severity]:
    release = ctx.target_release
    since = arch_facts()["vlm"]["new_layout_since"]
    what = f"It exists as {runtime}: transformers {since} moved VLM decoders (saved as `{src}`, built as `{dst}`)."
    if src.startswith("language_model.") and has_behaviour("vlm_key_mapping", release):
        return (f"{what} PEFT {release.version}'s PeftModel.from_pretrained remaps these keys; other loaders "
                "(load_adapter on older PEFT, vLLM, custom code) do not.", Severity.INFO)
    return f"{what} PEFT {release.version} does not remap them, so the adapter is a no-op.", Severity.ERROR


def _moe_drift(base: BaseModel, ctx: Context) -> tuple[str, Severity]:
    release = ctx.target_release
    conversion = behaviour("moe_per_expert_conversion")
    if base.model_type in conversion["model_types"] and has_behaviour("moe_per_expert_conversion", release):
        return (f"This is the transformers 4 per-expert layout; transformers 5 fuses experts, and PEFT {release.version} "
                "converts this family on load.", Severity.INFO)
    return ("This is the transformers 4 per-expert MoE layout; transformers 5 fuses experts into 3-D parameters and "
            f"PEFT {release.version} does not convert {base.model_type} adapters.", Severity.ERROR)
