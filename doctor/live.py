"""inspect_model: findings about a live model (what each module will run, and what that needs)."""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter, defaultdict
from typing import Any, Iterator

from .checks.patch import (
    BROKEN,
    DTYPE,
    FALLBACK,
    FOREIGN,
    FROZEN,
    MIXED,
    OFFLOAD_REPLACED,
    OURS,
    PACKED,
    PROJECTIONS,
    REENTRANT,
    UNSUPPORTED,
)
from .finding import Finding, Report, Severity, TargetReport


def inspect_model(model: Any, batch: dict[str, Any] | None = None) -> Report:
    """Report, before anything runs, modules whose forward will fail or is not their library's own; with
    `batch` (the keyword arguments of a forward), also whether its packed documents would be kept apart."""
    from adapter_doctor.runtime import introspect, specs

    label = type(model).__name__
    states = introspect.scan(model)
    findings = _forward_findings(states) + _mixed(model, states, introspect)
    findings += _training_findings(model)
    findings += _projection_findings(model, states)
    findings += _batch_findings(model, batch) if batch is not None else []
    model_type = _model_type(model)
    if model_type and not specs.supported(model_type):
        findings.append(UNSUPPORTED.finding(f"model_type {model_type!r}: ensure_patched leaves it as it is", label))
    return Report([TargetReport(label, "model", findings)])


def _forward_findings(states: list) -> list[Finding]:
    groups: dict[tuple, list] = defaultdict(list)
    for s in states:
        groups[(s.cls, s.origin, s.patcher, s.missing, s.missing_guarded, s.wrappers)].append(s)
    out = []
    for (cls, origin, _, missing, guarded, _wrappers), members in groups.items():
        first = members[0]
        where = f"{len(members)} {cls} module(s), e.g. {first.path or '(root)'}"
        how = first.described
        if origin == "ours":
            wrapped = f"; {how.partition(', wrapped by ')[2]} wraps it" if first.foreign_wrappers else ""
            out.append(OURS.finding(f"{where}: {first.marker}{wrapped}", first.path))
        elif missing:
            attrs = ", ".join(f"self.{a}" for a in sorted(missing))
            out.append(BROKEN.finding(f"{where} run {how}, which reads {attrs} on every path; these instances lack "
                                      f"{'it' if len(missing) == 1 else 'them'}, so the first forward raises "
                                      f"AttributeError: '{cls}' object has no attribute '{first.first_missing}'",
                                      first.path, title=f"{cls}: patched forward needs {', '.join(sorted(missing))}"))
        elif guarded:
            out.append(FALLBACK.finding(f"{where} run {how}; it reads {', '.join(sorted(guarded))} only behind a "
                                        "guard or on some paths, and these instances lack it: it may take a "
                                        "fallback path, or fail on a path the guard does not cover", first.path))
        elif origin == "swapped-class":
            out.append(FOREIGN.finding(f"{where} are instances of {first.patcher}'s class, swapped in for the "
                                       f"library's {first.swapped_for.__name__}", first.path))
        else:
            out.append(FOREIGN.finding(f"{where} run {how}", first.path))
    return out


def _mixed(model: Any, states: list, introspect: Any) -> list[Finding]:
    patched = Counter(s.cls for s in states if s.origin != "library")
    total = Counter(introspect.library_class(m).__name__ for m in model.modules())
    return [MIXED.finding(f"{patched[cls]} of {total[cls]} {cls} modules run a patched forward; the rest their own",
                          cls) for cls in sorted(patched) if patched[cls] < total[cls]]


def _model_type(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _training_findings(model: Any) -> list[Finding]:
    out = []
    label = type(model).__name__
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    base = next((p for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point()), None)
    if lora and model.training and not any(p.requires_grad for _, p in lora):
        out.append(FROZEN.finding(f"{len(lora)} LoRA parameters, none requires grad, and model.training is True", label))
    dtypes = Counter(str(p.dtype).removeprefix("torch.") for _, p in lora)
    if lora and base is not None and set(dtypes) != {str(base.dtype).removeprefix("torch.")}:
        base_dtype = str(base.dtype).removeprefix("torch.")
        risky = "float16" in dtypes and base_dtype == "bfloat16"
        out.append(DTYPE.finding(f"LoRA weights are {', '.join(sorted(dtypes))}; the base is {base_dtype}", label,
                                 severity=Severity.WARNING if risky else Severity.INFO))
    if _reentrant_checkpointing(model) and any(getattr(m, "_adapter_doctor_patch", None) for m in model.modules()):
        out.append(REENTRANT.finding("gradient checkpointing uses use_reentrant=True on patched layers", label))
    from adapter_doctor.runtime.checkpoint import replaced_layers

    replaced = replaced_layers(model)
    if replaced:
        out.append(OFFLOAD_REPLACED.finding(f"{len(replaced)} decoder layer(s), e.g. {replaced[0]}, run another "
                                            "checkpoint function than the offloaded one (torch's, after a "
                                            "gradient_checkpointing_enable), although enable_offloaded_checkpointing "
                                            "was called on this model", replaced[0]))
    return out


def _projection_findings(model: Any, states: list) -> list[Finding]:
    """On a model we patched: how many LoRA projections take each path; each fallback reason as a warning."""
    from adapter_doctor.runtime.eligibility import is_lora_linear, path_taken

    if not any(s.origin == "ours" for s in states):
        return []
    paths: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        if is_lora_linear(module):
            paths[path_taken(module)].append(name)
    if not paths:
        return []
    counts: Counter = Counter()
    for (path, _), names in paths.items():
        counts[path] += len(names)
    summary = "; ".join(f"{n} {path}" for path, n in sorted(counts.items()))  # a path's name may hold a comma
    out = [PROJECTIONS.finding(f"{sum(counts.values())} LoRA projections: {summary}", type(model).__name__)]
    for (path, reason), names in sorted(paths.items()):
        if path == "fallback":
            out.append(PROJECTIONS.finding(f"{len(names)} projection(s) fall back to PEFT's layer, e.g. {names[0]}: "
                                           f"{reason}", names[0], severity=Severity.WARNING,
                                           title="LoRA projections on the fallback path"))
    return out


def _batch_findings(model: Any, batch: dict[str, Any]) -> list[Finding]:
    from adapter_doctor.runtime import packing

    found = packing.problems(model, batch)
    attention = [p for p in found if p.cls != "labels"]
    out = []
    if attention:
        first = attention[0]
        more = f" (and {len(attention) - 1} more)" if len(attention) > 1 else ""
        out.append(PACKED.finding(f"{first.cls} at {first.path}{more}: {first.why}; fix: {first.fix}", first.path))
    out += [PACKED.finding(f"{p.why}; fix: {p.fix}", "labels", severity=Severity.WARNING,
                           title="Packed labels cross document boundaries") for p in found if p.cls == "labels"]
    return out


def _reentrant_checkpointing(model: Any) -> bool:
    from adapter_doctor.runtime.checkpoint import offloaded_checkpoint

    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(func, "func", func) is offloaded_checkpoint:  # ours: never reentrant
            continue
        if func is not None and getattr(module, "gradient_checkpointing", False):
            return bool(getattr(func, "keywords", {}).get("use_reentrant", True))
    return False


def inspect_saved_model(model_dir, adapter=None) -> Report:
    """Build the model in `model_dir` on CPU (weights on the meta device where possible), attach `adapter`
    trainable, and inspect it. A model that cannot be built is reported as an unreadable target."""
    label = str(model_dir) + (f" + {adapter}" if adapter else "")
    try:
        model = _build(model_dir, adapter)
    except Exception as exc:  # noqa: BLE001 - any failure to build is the user's answer, in one line
        return Report([TargetReport(label, "model", error=f"cannot build the model: {type(exc).__name__}: {exc}")])
    report = inspect_model(model)
    report.targets[0].path = label
    return report


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' logging, progress bars and FutureWarnings off while building, as they were after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the CLI reports; library chatter would bury it
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _build(model_dir, adapter):
    with _quiet():
        return _build_quietly(model_dir, adapter)


def _build_quietly(model_dir, adapter):
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    if adapter is None:
        with torch.device("meta"):  # the module tree is all inspection needs
            return transformers.AutoModelForCausalLM.from_config(config)
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    peft_model.train()
    return peft_model
