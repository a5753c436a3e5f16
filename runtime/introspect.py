"""Look inside a live model's modules: which forward will run, who put it there, what it needs from `self`.

A fast runtime may replace a class's `forward` (for every instance, process-wide) while giving only the
instances it loaded itself the attributes that forward reads. Reading the forward's bytecode tells
which attributes it needs, before the first call fails on a missing one.
"""
from __future__ import annotations

import dis
import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

# Where a forward's code comes from, by the top-level package of its module.
_PATCHERS = {
    "adapter_doctor": "adapter-doctor",
    "unsloth": "unsloth",
    "unsloth_zoo": "unsloth",
    "liger_kernel": "liger-kernel",
    "kernels": "hub kernels",
    "accelerate": "accelerate",
}
_LOAD_SELF = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_DEREF"}
_LOAD_ATTR = {"LOAD_ATTR", "LOAD_METHOD"}
_GUARDS = {"getattr", "hasattr"}


@dataclass(frozen=True)
class SelfReads:
    required: frozenset[str]  # read as self.x: raises AttributeError when missing
    guarded: frozenset[str]  # read through getattr(self, "x", default) or behind hasattr(self, "x")


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:  # nested functions and comprehensions may read self through a closure
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def self_reads(func: Callable[..., Any]) -> SelfReads:
    """The attributes `func` reads from its first argument, split by whether a missing one raises."""
    func = getattr(func, "__func__", func)
    while isinstance(func, functools.partial):
        func = func.func
    func = inspect.unwrap(func)  # decorators (kwarg deprecations, output recorders) hide the real code
    code = getattr(func, "__code__", None)
    if code is None or code.co_argcount == 0:
        return SelfReads(frozenset(), frozenset())
    return _reads(code)


@functools.lru_cache(maxsize=1024)
def _reads(code: types.CodeType) -> SelfReads:
    """Per code object: a model has thousands of modules but a handful of distinct forwards."""
    me = code.co_varnames[0]
    direct: set[str] = set()
    with_default: set[str] = set()  # getattr(self, "x", default)
    checked: set[str] = set()  # hasattr(self, "x"), which guards the direct reads of x too
    for sub in _codes(code):
        ins = list(dis.get_instructions(sub))
        for i, op in enumerate(ins[:-1]):
            if op.opname in _LOAD_SELF and op.argval == me:
                nxt = ins[i + 1]
                if nxt.opname in _LOAD_ATTR:
                    direct.add(str(nxt.argval))
                elif guard := _guard_call(ins, i):
                    (checked if guard == "hasattr" else with_default).add(str(nxt.argval))
    required = direct - checked
    return SelfReads(frozenset(required), frozenset((with_default | checked) - required))


def _guard_call(ins: list[dis.Instruction], i: int) -> str | None:
    """"getattr" or "hasattr" when `self` is their first argument and a string constant the second."""
    before = next((op for op in reversed(ins[:i]) if op.opname not in ("PUSH_NULL", "PRECALL")), None)
    after = ins[i + 1]
    name = str(before.argval).removeprefix("NULL + ") if before is not None and before.opname == "LOAD_GLOBAL" else ""
    return name if name in _GUARDS and after.opname == "LOAD_CONST" and isinstance(after.argval, str) else None


def patcher_of(func: Callable[..., Any]) -> str:
    """Who wrote this forward, by its module: adapter-doctor, unsloth, liger-kernel, ..., or unknown."""
    module = getattr(getattr(func, "__func__", func), "__module__", None) or "?"
    return _PATCHERS.get(module.split(".")[0], f"unknown ({module})")


@dataclass(frozen=True)
class ForwardState:
    path: str
    cls: str
    forward: Callable[..., Any]
    origin: str  # "library", "class-patch", "instance-patch" or "ours"
    patcher: str
    missing: frozenset[str]  # required attributes the instance lacks: the call will raise
    missing_guarded: frozenset[str]  # guarded ones it lacks: the forward falls back
    marker: object = None  # our patch marker, when origin is "ours"


def _owner_forward(cls: type) -> tuple[type, Callable[..., Any]]:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return klass, vars(klass)["forward"]
    return cls, getattr(cls, "forward", None)


def library_class(module: Any) -> type:
    """The class a module had before any adapter-doctor patch (ours are generated subclasses)."""
    return next((k for k in type(module).__mro__ if not (k.__module__ or "").startswith("adapter_doctor")), type(module))


def forward_state(path: str, module: Any) -> ForwardState:
    cls = type(module)
    marker = getattr(module, "_adapter_doctor_patch", None)
    instance = module.__dict__.get("forward")
    if instance is not None and getattr(module, "_hf_hook", None) is not None:
        instance = None  # accelerate's device hook wraps the real forward; look at that one instead
    if marker is not None:
        origin, func = "ours", _owner_forward(cls)[1]
    elif instance is not None:
        origin, func = "instance-patch", getattr(instance, "__func__", instance)
    else:
        owner, func = _owner_forward(cls)
        library = (owner.__module__ or "").split(".")[0]
        origin = "library" if (getattr(func, "__module__", "") or "").split(".")[0] == library else "class-patch"
    reads = self_reads(func) if func is not None else SelfReads(frozenset(), frozenset())
    missing = frozenset(a for a in reads.required if not _has(module, a))
    missing_guarded = frozenset(a for a in reads.guarded if not _has(module, a))
    return ForwardState(path, library_class(module).__name__, func, origin, patcher_of(func), missing, missing_guarded,
                        marker)


def _has(module: Any, name: str) -> bool:
    try:
        getattr(module, name)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001 - a property that fails for another reason still exists
        return True
    return True


def scan(model: Any) -> list[ForwardState]:
    """The state of every module whose forward is not its library's own."""
    out = []
    for path, module in model.named_modules():
        state = forward_state(path, module)
        if state.origin != "library":
            out.append(state)
    return out
