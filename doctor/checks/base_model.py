"""base-model: can the base named in the config be found, and is it the model the adapter was trained on?"""
from __future__ import annotations

import re
from typing import Iterator

from ..finding import Finding, Severity
from . import Check, Context, register, runner

CAT = "base-model"
ABS_MISSING = Check(
    "ADC301", CAT, Severity.WARNING, "The base is an absolute path that does not exist here",
    "PEFT records the base as it was loaded in training. An absolute path from another machine makes "
    "AutoPeftModel and `from_pretrained(adapter_dir)` fail; loading the base yourself still works.",
    fixer="set-base", manual="doctor fix --only ADC301 --set-base NAME_OR_PATH")
WINDOWS = Check(
    "ADC302", CAT, Severity.WARNING, "The base is a Windows path",
    "A Windows path cannot be resolved on Linux or macOS, and the Hub rejects it as a repo id.", fixer="set-base",
    manual="doctor fix --only ADC302 --set-base NAME_OR_PATH")
QUANTIZED = Check(
    "ADC303", CAT, Severity.INFO, "Trained on a quantized base",
    "The base name says 4-bit/8-bit (bnb, GPTQ, AWQ). Loading it by name needs that quantization library. Loading the "
    "adapter onto the full-precision model works (keys are the same) but outputs drift slightly, because the "
    "adapter learned to correct the quantized weights.", fixer="set-base",
    manual="doctor fix --only ADC303 --set-base NAME_OR_PATH")
REVISION = Check(
    "ADC304", CAT, Severity.WARNING, "revision is \"unsloth\"",
    "Unsloth writes `revision: \"unsloth\"`. PEFT passes it to the Hub when it loads the base by name, and no such "
    "revision exists there, so AutoPeftModel fails with a revision-not-found error.", fixer="migrate-config")
UNRESOLVED = Check(
    "ADC305", CAT, Severity.INFO, "The base cannot be found offline",
    "The base is neither a folder here nor in the local Hugging Face cache. Loading will download it, which fails "
    "offline, and doctor cannot compare shapes or module names. Pass --base DIR to check against a local copy.",
    manual="Pass --base DIR, or download the base once (huggingface-cli download NAME).")
MISMATCH = Check(
    "ADC306", CAT, Severity.ERROR, "The base's architecture differs from the adapter's",
    "The adapter records the model class it was trained on; the base found here is another architecture. PEFT may "
    "still load it when module names coincide, and silently compute nonsense.",
    manual="Load the adapter onto the base it was trained on.")
NO_BASE = Check(
    "ADC307", CAT, Severity.INFO, "No base model recorded",
    "base_model_name_or_path is empty, so only code that passes the base explicitly can load the adapter.",
    fixer="set-base", manual="doctor fix --only ADC307 --set-base NAME_OR_PATH")
BASE_UNREADABLE = Check(
    "ADC308", CAT, Severity.WARNING, "The base folder cannot be read",
    "The base folder exists but has no readable config.json, so shape and key checks against it are skipped.")
register(ABS_MISSING, WINDOWS, QUANTIZED, REVISION, UNRESOLVED, MISMATCH, NO_BASE, BASE_UNREADABLE)

_QUANT = re.compile(r"bnb[-_]?[48]bit|[-_][48]bit\b|gptq|\bawq\b|[-_]awq|[-_]int[48]\b|[-_]nf4\b", re.I)


@runner
def check(ctx: Context) -> Iterator[Finding]:
    config = ctx.artifact.config
    if config is None or ctx.not_peft:
        return
    res = ctx.resolution
    where = ctx.config_file("base_model_name_or_path")
    name = res.name
    if res.kind == "none" and res.source is None:
        yield NO_BASE.finding("base_model_name_or_path is empty or missing", where)
    elif res.kind == "windows":
        yield WINDOWS.finding(f"base_model_name_or_path is {name!r}", where)
    elif res.kind == "absolute-missing":
        yield ABS_MISSING.finding(f"{name} does not exist on this machine", where)
    elif res.kind == "placeholder":
        yield UNRESOLVED.finding(f"{name!r} looks like a placeholder, not a model", where, severity=Severity.WARNING,
                                 title="The base name is a placeholder")
    elif res.kind in ("hub-missing", "relative-missing"):
        what = "a relative path that does not exist from here" if res.kind == "relative-missing" else "not in the local HF cache"
        yield UNRESOLVED.finding(f"{name!r} is {what}", where)
    elif res.kind == "unreadable":
        yield BASE_UNREADABLE.finding(res.detail, where)
    if isinstance(name, str) and _QUANT.search(name):
        yield from _quantized(ctx, name, where)
    if config.get("revision") == "unsloth":
        yield REVISION.finding("revision is \"unsloth\", which no Hub repository has", ctx.config_file("revision"))
    if ctx.base is not None:
        yield from _architecture(ctx, config)


def _quantized(ctx: Context, name: str, where: str) -> Iterator[Finding]:
    base = ctx.base
    if base is not None and not base.quantized:
        yield QUANTIZED.finding(
            f"trained on {name!r}, loaded here onto the full-precision {base.path}: expect small output drift",
            where, severity=Severity.WARNING, title="Trained on a quantized base, loaded onto full precision")
    else:
        yield QUANTIZED.finding(f"{name!r} is a quantized model; loading it by name needs bitsandbytes (or GPTQ/AWQ)", where)


def _family(class_name: str) -> str:
    # "Qwen2ForCausalLM" -> "qwen2"; "LlamaModel" -> "llama"
    return re.split(r"For[A-Z]|Model$", class_name)[0].lower()


def _architecture(ctx: Context, config: dict) -> Iterator[Finding]:
    base = ctx.base
    auto = config.get("auto_mapping")
    claimed = auto.get("base_model_class") if isinstance(auto, dict) else None
    archs = base.architectures
    if isinstance(claimed, str) and archs and _family(claimed) not in {_family(a) for a in archs}:
        yield MISMATCH.finding(
            f"the adapter was trained on a {claimed}; the base at {base.path} is a {archs[0]}",
            ctx.config_file("auto_mapping"))
