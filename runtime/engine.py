"""patch / unpatch: swap supported instances to generated subclasses, all or nothing, and undo it exactly.

Nothing here assigns to a transformers or PEFT class. The plan, validated before anything changes:
1. A module type with a spec gets our implementation.
2. A module a patcher changed that we have no implementation of gets its library's own forward back (read
   afresh from the library's source, `pristine.py`) when it is broken or calls modules we patch; a module of a
   class swapped at module level is replaced there by a new instance of the library's class.
3. A wrapper someone else put around a forward (accelerate's hook, TRL's head, an fp32 cast) keeps running:
   accelerate's `_old_forward` and a wrapper's closure are pointed at the forward that should run.
4. A module left broken makes `patch` raise before changing anything.

Each instance changes in few places: its `__class__`; a foreign instance-level `forward`, removed while
patched; accelerate's `_old_forward` or a wrapper's closure cell, re-pointed; a swapped child, replaced. What
was removed or replaced waits in `_adapter_doctor_saved` (on the module, or its parent for a child) until
`unpatch` puts it back.
"""
from __future__ import annotations

import itertools
import types
from dataclasses import dataclass
from typing import Any

from . import introspect, packing
from .classes import marker_of, patched_class, restored_class, unpatched_class
from .modules import IMPLEMENTATIONS
from .pristine import pristine_attr, pristine_instance
from .report import (
    ALREADY,
    BROKEN,
    KEPT,
    PATCHED,
    REPAIRED,
    RESTORED,
    SKIPPED,
    UNSUPPORTED,
    Fallback,
    ModuleAction,
    PatchError,
    PatchReport,
    Projection,
)
from .specs import ModuleSpec, match, specs_for

SAVED = "_adapter_doctor_saved"
_TOUCHED = ("forward", "_old_forward", SAVED)
_MISSING = object()
_PROJECTING = ("attention", "gated_mlp")  # implementations that call projections through the LoRA kernel


@dataclass
class _Step:
    path: str
    module: Any
    state: introspect.ForwardState  # before patching
    library: type  # the library class whose behaviour the module gets
    spec: ModuleSpec | None = None  # our implementation; None restores the library's forward
    forward: Any = None  # the library's forward, for a restore
    parents: list[tuple[Any, str]] | None = None  # for a swapped child: where it sits, and its new instance
    replacement: Any = None

    @property
    def foreign(self) -> bool:
        return introspect.is_foreign(self.state)

    @property
    def repairs(self) -> bool:
        return self.foreign and bool(self.state.missing)


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

    `kernels` is a kernel set name ("auto", "torch", ...) or a `KernelSet`. Raises PatchError, with nothing
    changed, when a module would be left broken, or (strict=True) anything supported is left unpatched.
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
    if report.broken or (strict and report.failures):
        raise PatchError(report)
    _apply(steps, kernel)
    packing.forget(model)  # its attention classes changed: the packing check must look again
    for step in steps:
        report.modules.append(_action(step))
        if step.spec is not None and step.spec.implementation in _PROJECTING:
            projections = _projections(step.path, step.module)
            report.projections += projections
            report.fallbacks += [Fallback(p.path, p.reason) for p in projections if p.path_taken == "fallback"]
    return report


def _action(step: _Step) -> ModuleAction:
    s = step.state
    replaced = s.described if step.foreign else ""
    reason = f"lacked {', '.join(sorted(s.missing))}" if step.repairs else ""
    if step.spec is not None:
        return ModuleAction(step.path, step.library.__name__, REPAIRED if step.repairs else PATCHED, reason,
                            step.spec.implementation, replaced)
    why = "the library's own class in place of a swapped one" if step.replacement is not None \
        else "the library's own forward"
    return ModuleAction(step.path, step.library.__name__, RESTORED, f"{reason}; {why}" if reason else why,
                        "library", replaced)


def _plan(model: Any, specs: tuple[ModuleSpec, ...], report: PatchReport) -> list[_Step]:
    """Validate every module; nothing changes here. Returns what to change, records the rest in `report`."""
    ours: list[_Step] = []
    others: list[tuple[str, Any, list[tuple[Any, str]], introspect.ForwardState]] = []
    unfit: dict[str, ModuleAction] = {}
    for path, module, parents in introspect.walk(model):
        marker = marker_of(module)
        if marker is not None:
            report.modules.append(ModuleAction(path, marker.original.__name__, ALREADY, str(marker),
                                               marker.implementation))
            continue
        state = introspect.forward_state(path, module, parents)
        found = match(specs, module) if specs and state.origin != "swapped-class" else None
        reason = _unfit(module, found[0]) if found else "no spec"
        if found and not reason and not state.foreign_wrappers:
            ours.append(_Step(path, module, state, found[1], spec=found[0]))
            continue
        if found and reason and not state.foreign_wrappers:
            unfit[path] = ModuleAction(path, found[1].__name__, SKIPPED, reason, found[0].implementation)
        others.append((path, module, parents, state))
    patched = [s.path for s in ours]
    steps = list(ours)
    for path, module, parents, state in others:
        step = _restore_step(path, module, parents, state, calls_ours=_is_ancestor(path, patched))
        if step is not None:
            steps.append(step)
            continue
        if path in unfit:
            report.modules.append(unfit[path])
        if state.foreign_wrappers and not introspect.is_foreign(state):
            who = ", ".join(f"{w.name} ({w.author})" for w in state.foreign_wrappers)
            report.modules.append(ModuleAction(path, state.cls, KEPT, f"wrapped by {who}, which calls the "
                                               "library's forward; left as it is, its submodules patched"))
        elif introspect.is_foreign(state) and state.missing:
            report.modules.append(ModuleAction(path, state.cls, BROKEN, f"runs {state.described}, which reads "
                                               f"{', '.join(sorted(state.missing))}; it lacks them, and the "
                                               "library's own forward cannot be read afresh"))
    return steps


def _is_ancestor(path: str, paths: list[str]) -> bool:
    prefix = f"{path}." if path else ""
    return any(p.startswith(prefix) and p != path for p in paths)


def _restore_step(path: str, module: Any, parents: list[tuple[Any, str]], state: introspect.ForwardState,
                  calls_ours: bool) -> _Step | None:
    """The library's behaviour back for a foreign module that is broken or calls modules we patch."""
    if not introspect.is_foreign(state) or not (state.missing or calls_ours or state.origin == "swapped-class"):
        return None
    if state.origin == "swapped-class":
        config = next((p.config for p, _ in parents if getattr(p, "config", None) is not None), None)
        fresh = pristine_instance(state.swapped_for, module, config) if config is not None else None
        if fresh is None or state.swapped_for is None:
            return None
        return _Step(path, module, state, state.swapped_for, parents=parents, replacement=fresh)
    library = introspect.library_class(module)
    forward = pristine_attr(library, "forward")
    if forward is None or any(not introspect.has_attr(module, a) for a in _needs(forward)):
        return None
    return _Step(path, module, state, library, forward=forward)


def _needs(forward: Any) -> frozenset[str]:
    from .reads import self_reads

    return self_reads(forward).required


def _unfit(module: Any, spec: ModuleSpec) -> str:
    missing = [name for name in spec.needs if not introspect.has_attr(module, name)]
    if missing:
        return f"lacks {', '.join(missing)}, which {spec.implementation} needs"
    check = IMPLEMENTATIONS[spec.implementation][1]
    return (check(module, spec.options) if check is not None else None) or ""


def _projections(path: str, module: Any) -> list[Projection]:
    from .eligibility import is_lora_linear, path_taken

    return [Projection(f"{path}.{name}" if path else name, *path_taken(child))
            for name, child in module.named_children() if is_lora_linear(child)]


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
    """Make every planned change; if any fails, put every module back as it was and re-raise."""
    done: list[Any] = []  # undo callables
    try:
        for step in steps:
            if step.replacement is not None:
                done.append(_replace_child(step))
                continue
            snapshot, cells = _snapshot(step.module), _wrapper_cells(step.module)
            done.append(lambda m=step.module, s=snapshot, c=cells: (_restore(m, s), _put_cells(c)))
            _swap(step, kernel)
    except BaseException:
        for undo in reversed(done):
            undo()
        raise


def _replace_child(step: _Step) -> Any:
    """The new instance everywhere the swapped one sat; each parent keeps the old one for unpatch."""
    old = step.module
    for parent, name in step.parents or []:
        setattr(parent, name, step.replacement)
        parent.__dict__.setdefault(SAVED, {}).setdefault("children", {})[name] = old

    def undo() -> None:
        for parent, name in step.parents or []:
            setattr(parent, name, old)
            parent.__dict__.get(SAVED, {}).get("children", {}).pop(name, None)
    return undo


def _wrapper_cells(module: Any) -> list[tuple[Any, Any]]:
    """(cell, contents) of the closure cells through which instance wrappers call the module's forward."""
    wrappers, _, _ = introspect.resolve(module)
    cells = (introspect.captured_cell(w, module) for w in wrappers)
    return [(cell, cell.cell_contents) for cell in cells if cell is not None]


def _put_cells(cells: list[tuple[Any, Any]]) -> None:
    for cell, value in cells:
        cell.cell_contents = value


def _swap(step: _Step, kernel: Any) -> None:
    module = step.module
    original = type(module)
    if step.spec is not None:
        cls = patched_class(original, step.library, step.spec, kernel)
    else:
        cls = restored_class(original, step.forward)
    saved: dict[str, Any] = {}
    cells = _wrapper_cells(module)
    if introspect.accelerate_hooked(module):
        saved["_old_forward"] = module.__dict__["_old_forward"]
        module.__dict__["_old_forward"] = types.MethodType(cls.forward, module)
    elif cells:  # a wrapper calls the forward it captured: point it at ours, keep the wrapper
        saved["cells"] = cells
        for cell, _ in cells:
            cell.cell_contents = types.MethodType(cls.forward, module)
    elif "forward" in module.__dict__:
        saved["forward"] = module.__dict__.pop("forward")
    if saved:
        module.__dict__[SAVED] = saved
    module.__class__ = cls
    if marker_of(module) is None:
        raise RuntimeError(f"{step.path}: the patched class did not take")


def unpatch(model: Any) -> int:
    """Give every module we patched its previous class, instance attributes and children back. Returns how
    many modules changed back."""
    count = 0
    for module in list(model.modules()):
        saved = module.__dict__.get(SAVED, {})
        for name, child in saved.pop("children", {}).items():
            setattr(module, name, child)
            count += 1
        marker = marker_of(module)
        if marker is None:
            if not saved:
                module.__dict__.pop(SAVED, None)
            continue
        module.__dict__.pop(SAVED, None)
        _put_cells(saved.pop("cells", []))
        for key, value in saved.items():
            module.__dict__[key] = value
        module.__class__ = unpatched_class(type(module), marker.original)
        count += 1
    packing.forget(model)
    return count
