"""keys-unmatched: adapter weights that will not land where they should, so part or all of it is lost."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterator

from ..adapter_keys import MAX_SUFFIXES, AdapterKey, ModuleSelector, ParameterSelector, dot_suffixes
from ..base_model import BaseModel, arch_facts, expert_regex, family_of
from ..finding import Finding, Severity, brief, sample
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


class _Selection:
    """What the config selects, each selector built once: a config may list millions of names."""

    def __init__(self, config: dict, ctx: Context) -> None:
        self.targets = ModuleSelector(config.get("target_modules"), ctx.matcher)
        self.excluded = ModuleSelector(config.get("exclude_modules"), ctx.matcher)
        self.parameters = ParameterSelector(config.get("target_parameters"))
        saved, task = config.get("modules_to_save"), config.get("task_type")
        heads = TASK_HEADS.get(task, []) if isinstance(task, str) else []
        self.saved = tuple(sorted({s for s in [*(saved if isinstance(saved, list) else []), *heads] if isinstance(s, str)}))
        # PEFT wraps every module whose name ends with an entry, as plain text: "classifier" takes
        # "pre_classifier" too (0.3+). 0.1 and 0.2 test `entry in name` on parameter names.
        self.saved_match = ctx.target_release.modules_to_save_match
        self.layers = _wanted_layers(config.get("layers_to_transform"))
        self.bias = config.get("bias") in ("all", "lora_only")
        self._seen: dict[str, bool | None] = {}

    def saved_whole(self, module: str) -> bool:
        """Is `module` (or a module containing it) wrapped by modules_to_save, explicitly or by the task head?"""
        if not self.saved:
            return False
        if self.saved_match == "substring":
            return any(s in module for s in self.saved)
        parts = module.split(".", MAX_SUFFIXES)[:MAX_SUFFIXES]
        return any(".".join(parts[:j]).endswith(self.saved) for j in range(len(parts), 0, -1))

    def layer_ok(self, module: str) -> bool:
        if self.layers is None:
            return True
        m = _LAYER_INDEX.search(module)
        return m is None or len(m.group(1)) > 18 or int(m.group(1)) in self.layers

    def selected(self, k: AdapterKey) -> bool | None:
        if k.role in ("prompt", "tokens"):
            return True
        if k.role != "full":  # a LoRA role: the answer depends on the module alone, shared by A and B
            if k.module not in self._seen:
                self._seen[k.module] = self._lora_selected(k.module)
            return self._seen[k.module]
        if self.excluded(k.module):
            return False
        if self.saved_whole(k.module):
            return True
        if k.module.rsplit(".", 1)[-1] in _EMBEDDING_NAMES:
            return True  # PEFT saves resized or targeted embeddings in full
        if k.param == "bias" and self.bias:
            return True
        return self._targeted(k.module)

    def _lora_selected(self, module: str) -> bool | None:
        if self.excluded(module):
            return False
        return True if self.parameters(module) else self._targeted(module)

    def _targeted(self, module: str) -> bool | None:
        hit = self.targets(module)
        return hit if hit is None else hit and self.layer_ok(module)


def _wanted_layers(layers: object) -> frozenset[int] | None:
    if isinstance(layers, int) and not isinstance(layers, bool):
        return frozenset({layers})
    if isinstance(layers, list):
        return frozenset(x for x in layers if isinstance(x, int) and not isinstance(x, bool))
    return None


@runner
def check(ctx: Context) -> Iterator[Finding]:
    tensors, config = ctx.artifact.tensors, ctx.artifact.config
    if not tensors or config is None or ctx.peft_type not in LORA_TYPES:
        return
    where = str(ctx.artifact.primary_weights.path)
    keys = list(ctx.artifact.keys.values())
    selection = _Selection(config, ctx)
    yield from _unpaired(keys, where)
    yield from _untargeted(selection, keys, where)
    if ctx.base is not None and ctx.base.modules:
        yield from _against_base(ctx, config, selection, keys, where, ctx.base)
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


def _untargeted(selection: _Selection, keys: list[AdapterKey], where: str) -> Iterator[Finding]:
    stray = sorted({k.module for k in keys if selection.selected(k) is False})
    if stray:
        names = sorted({m.rsplit(".", 1)[-1] for m in stray})
        yield UNTARGETED.finding(
            f"{len(stray)} module(s) have weights but are not selected by target_modules/modules_to_save "
            f"({sample(names)}), e.g. {stray[0]}; PEFT will drop them silently", f"{where}#{stray[0]}")


def _targets_without_weights(ctx: Context, config: dict, keys: list[AdapterKey]) -> Iterator[Finding]:
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not keys:
        return
    lora_modules = {k.module for k in keys if k.role.startswith("lora_")}
    longest = max((len(t) for t in targets if isinstance(t, str)), default=0)
    trained = {s for m in lora_modules for s in dot_suffixes(m, longest)}
    unused = [t for t in targets if isinstance(t, str) and t not in trained]
    if unused and lora_modules:
        yield NO_WEIGHTS.finding(
            f"target_modules lists {sample(unused)} but the file has no LoRA weights for them; if the base has such "
            "modules, they load untrained (pass --base to know)", ctx.config_file("target_modules"), severity=Severity.INFO)


def _against_base(ctx: Context, config: dict, selection: _Selection, keys: list[AdapterKey], where: str,
                  base: BaseModel) -> Iterator[Finding]:
    modules = base.modules
    adapter_modules = ctx.adapter_modules
    renamed = ctx.renamed_modules  # ADC518 and ADC520 explain those
    heads = _task_heads(config)
    missing = [m for m in adapter_modules if m not in modules and m not in renamed and not _task_built(m, heads)]
    if missing:
        cause, severity = _drift(missing[0], base, ctx)
        share = "all" if len(missing) == len(adapter_modules) else f"{len(missing)} of {len(adapter_modules)}"
        yield KEYS_NOT_IN_BASE.finding(
            f"{share} adapter modules are not in the base at {base.path}, e.g. {missing[0]}. {cause}",
            f"{where}#{missing[0]}", severity=severity)
    targets = config.get("target_modules")
    if not isinstance(targets, (list, str)) or targets == "all-linear":
        return
    answers = {m: selection.targets(m) for m, mod in modules.items() if mod.kind != "experts"}
    if None in answers.values():  # a regex that cannot be run in bounded time (ADC109 says why)
        return
    matched = [m for m, hit in answers.items() if hit]
    if not matched and not config.get("target_parameters") and not renamed:
        yield TARGET_NOT_IN_BASE.finding(
            f"no module of the base at {base.path} matches target_modules={brief(targets)}: PEFT raises "
            "`ValueError: Target modules ... not found in the base model`", ctx.config_file("target_modules"))
        return
    trained = {k.module for k in keys if k.role.startswith("lora_")}
    untrained = [m for m in matched if m not in trained and selection.layer_ok(m)]
    if untrained and trained and not missing and not renamed:  # with path drift, the finding above already explains the gap
        yield NO_WEIGHTS.finding(
            f"{len(untrained)} of {len(matched)} base modules selected by target_modules have no weights in the file, "
            f"e.g. {untrained[0]}; they load with lora_B = 0", ctx.config_file("target_modules"))


def _task_heads(config: dict) -> tuple[str, ...]:
    task = config.get("task_type")
    return tuple(TASK_HEADS.get(task, ())) if isinstance(task, str) else ()


def _task_built(module: str, heads: tuple[str, ...]) -> bool:
    """A head that the task type's model class adds at its root (`score` of LlamaForSequenceClassification,
    DistilBERT's `pre_classifier` and `classifier`): the base's own class, often *ForCausalLM, lacks it."""
    return bool(heads) and module.split(".", 1)[0].endswith(heads)


def _drift(module: str, base: BaseModel, ctx: Context) -> tuple[str, Severity]:
    facts = arch_facts()
    for old, new in facts["vlm"]["renames"]:
        for src, dst in ((old, new), (new, old)):
            if module.startswith(src) and dst + module[len(src):] in base.modules:
                return _vlm_drift(src, dst, dst + module[len(src):], ctx)
    layout = facts["moe"]["layouts"].get(family_of(base.model_type) or "")
    if layout:
        per_expert = expert_regex(layout["per_expert"])
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
