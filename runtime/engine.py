"""patch / unpatch: swap supported instances to generated subclasses, all or nothing, and undo it exactly.

Nothing here assigns to a transformers or PEFT class. Each instance changes in at most three places: its
`__class__`; a foreign instance-level `forward`, removed while patched; accelerate's `_old_forward`, pointed
at our forward so its device hook keeps wrapping it. What was removed or replaced waits in the instance's
`_adapter_doctor_saved` until `unpatch` puts it back.
"""
from __future__ import annotations

import itertools
import types
from dataclasses import dataclass
from typing import Any

from . import introspect
from .classes import marker_of, patched_class
from .modules import IMPLEMENTATIONS
from .report import ALREADY, BROKEN, PATCHED, REPAIRED, SKIPPED, UNSUPPORTED, Fallback, ModuleAction, PatchError, \
    PatchReport
from .specs import ModuleSpec, match, specs_for

SAVED = "_adapter_doctor_saved"
_TOUCHED = ("forward", "_old_forward", SAVED)
_MISSING = object()
_PROJECTING = ("attention", "gated_mlp")  # implementations that call projections through the LoRA kernel


@dataclass
class _Step:
    path: str
    module: Any
    spec: ModuleSpec
    library: type
    state: Any  # introspect.ForwardState before patching
    foreign: bool  # the forward that ran was not the library's own

    @property
    def repairs(self) -> bool:
        return self.foreign and bool(self.state.missing)


def _root(module_name: str | None) -> str:
    return (module_name or "").split(".")[0]


def model_type_of(model: Any) -> str | None:
    """`config.model_type` of a bare transformers model, a PeftModel, or anything holding one."""
    modules = model.modules() if hasattr(model, "modules") else iter(())
    configs = (getattr(m, "config", None) for m in itertools.chain([model], modules))  # lazy: the first one wins
    for config in configs:
        model_type = getattr(config, "model_type", None)
        if isinstance(model_type, str) and model_type:
            if not specs_for(model_type) and hasattr(config, "get_text_config"):
                return getattr(config.get_text_config(), "model_type", model_type) or model_type
            return model_type
    return None


def patch(model: Any, *, strict: bool = False, kernels: Any = "auto") -> PatchReport:
    """Patch every supported module of `model` in place; see the module docstring for what changes.

    `kernels` is a kernel set name ("auto", "torch", ...) or a `KernelSet`.
    """
    from adapter_doctor.kernels import KernelSet, kernel_set

    from .classes import _version

    kernel = kernels if isinstance(kernels, KernelSet) else kernel_set(kernels)
    model_type = model_type_of(model)
    report = PatchReport(model_type, kernel.name, _version(), strict)
    specs = specs_for(model_type)
    if not specs:
        report.modules.append(ModuleAction("", type(model).__name__, UNSUPPORTED,
                                           f"no spec for model_type {model_type!r}"))
    steps = _plan(model, specs, report)
    if strict and report.failures:
        raise PatchError(report)
    _apply(steps, kernel)
    for step in steps:
        s = step.state
        replaced = f"{getattr(s.forward, '__module__', '?')}.{getattr(s.forward, '__qualname__', '?')} ({s.patcher})" \
            if step.foreign else ""
        reason = f"lacked {', '.join(sorted(s.missing))}" if step.repairs else ""
        report.modules.append(ModuleAction(step.path, step.library.__name__, REPAIRED if step.repairs else PATCHED,
                                           reason, step.spec.implementation, replaced))
        if step.spec.implementation in _PROJECTING:
            report.fallbacks += _fallbacks(step.path, step.module)
    return report


def _plan(model: Any, specs: tuple[ModuleSpec, ...], report: PatchReport) -> list[_Step]:
    """Validate every module; nothing changes here. Returns what to patch, records the rest in `report`."""
    steps = []
    for path, module in model.named_modules():
        marker = marker_of(module)
        if marker is not None:
            report.modules.append(ModuleAction(path, marker.original.__name__, ALREADY, str(marker),
                                               marker.implementation))
            continue
        state = introspect.forward_state(path, module)
        broken = state.origin != "library" and bool(state.missing)
        why_broken = f"its forward from {state.patcher} reads {', '.join(sorted(state.missing))}, which it lacks"
        found = match(specs, module) if specs else None
        if found is None:
            if broken:
                report.modules.append(ModuleAction(path, state.cls, BROKEN, why_broken))
            continue
        spec, library = found
        # Foreign is judged against the spec's transformers class, so a subclass swapped in counts too.
        foreign = _root(getattr(state.forward, "__module__", None)) != _root(library.__module__)
        broken = foreign and bool(state.missing)
        reason = _unfit(module, spec)
        if reason:
            reason = f"{reason}; {why_broken}" if broken else reason
            report.modules.append(ModuleAction(path, library.__name__, SKIPPED, reason, spec.implementation))
            continue
        steps.append(_Step(path, module, spec, library, state, foreign))
    return steps


def _unfit(module: Any, spec: ModuleSpec) -> str:
    missing = [name for name in spec.needs if not _has(module, name)]
    if missing:
        return f"lacks {', '.join(missing)}, which {spec.implementation} needs"
    check = IMPLEMENTATIONS[spec.implementation][1]
    return (check(module) if check is not None else None) or ""


def _has(module: Any, name: str) -> bool:
    try:
        getattr(module, name)
    except AttributeError:
        return False
    return True


def _fallbacks(path: str, module: Any) -> list[Fallback]:
    from adapter_doctor.kernels import is_lora_linear, why_not_fused

    out = []
    for name, child in module.named_children():
        reason = why_not_fused(child) if is_lora_linear(child) else None
        if reason:
            out.append(Fallback(f"{path}.{name}" if path else name, reason))
    return out


def _snapshot(module: Any) -> tuple[type, dict[str, Any]]:
    return type(module), {key: module.__dict__.get(key, _MISSING) for key in _TOUCHED}


def _restore(module: Any, snapshot: tuple[type, dict[str, Any]]) -> None:
    cls, entries = snapshot
    for key, value in entries.items():
        if value is _MISSING:
            module.__dict__.pop(key, None)
        else:
            module.__dict__[key] = value
    module.__class__ = cls


def _apply(steps: list[_Step], kernel: Any) -> None:
    """Swap every planned module; if any swap fails, put every module back as it was and re-raise."""
    done: list[tuple[Any, tuple[type, dict[str, Any]]]] = []
    try:
        for step in steps:
            done.append((step.module, _snapshot(step.module)))
            _swap(step, kernel)
    except BaseException:
        for module, snapshot in reversed(done):
            _restore(module, snapshot)
        raise


def _accelerate_hooked(module: Any) -> bool:
    return getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__


def _swap(step: _Step, kernel: Any) -> None:
    module = step.module
    cls = patched_class(type(module), step.library, step.spec, kernel)
    saved = {}
    if _accelerate_hooked(module):
        saved["_old_forward"] = module.__dict__["_old_forward"]
        module.__dict__["_old_forward"] = types.MethodType(cls.forward, module)
    elif "forward" in module.__dict__:
        saved["forward"] = module.__dict__.pop("forward")
    if saved:
        module.__dict__[SAVED] = saved
    module.__class__ = cls
    if marker_of(module) is None or ("forward" in module.__dict__ and not _accelerate_hooked(module)):
        raise RuntimeError(f"{step.path}: the patched forward is not the one that runs")


def unpatch(model: Any) -> int:
    """Give every module we patched its previous class and instance attributes back. Returns how many."""
    count = 0
    for module in model.modules():
        marker = marker_of(module)
        if marker is None:
            continue
        for key, value in module.__dict__.pop(SAVED, {}).items():
            module.__dict__[key] = value
        module.__class__ = marker.original
        count += 1
    return count
