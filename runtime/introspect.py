"""Look inside a live model's modules: which forward will run, who wrote it, and what it needs from `self`.

A fast runtime may replace a class's `forward` for every instance in the process, yet give only the instances
it loaded itself the attributes that forward reads. Others wrap a forward per instance (accelerate's hooks and
fp32 cast, TRL's fused head, `torch.compile`). Per module, this follows the wrappers to the function that
really computes, judges it against the library's own code read afresh (`pristine.py`), and names its author
from where its code object was compiled, never from a copied `__name__` or `__module__`.
"""
from __future__ import annotations

import functools
import os
import sys
import sysconfig
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .pristine import innermost, is_library, library_root, same_code, swapped_class, unbound
from .reads import SelfReads, self_reads

MARKER = "_adapter_doctor_patch"
# Authors by top-level package of the file a code object was compiled from.
_AUTHORS = {
    "adapter_doctor": "adapter-doctor",
    "unsloth": "unsloth",
    "unsloth_zoo": "unsloth",
    "unsloth_compiled_cache": "unsloth",
    "liger_kernel": "liger-kernel",
    "kernels": "hub kernels",
    "accelerate": "accelerate",
    "trl": "trl",
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
}
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"])
_ORIGINS = ("library", "class-patch", "instance-patch", "ours", "swapped-class")


@dataclass(frozen=True)
class Wrapper:
    """An instance-level wrapper around the forward that computes; it calls through to it."""

    name: str  # module.qualname of the wrapper's own code
    author: str
    hook: bool = False  # accelerate's device hook, which calls whatever module._old_forward is


@dataclass(frozen=True)
class ForwardState:
    path: str
    cls: str  # the library class name
    forward: Callable[..., Any] | None  # the function that computes, under any wrappers
    origin: str  # one of _ORIGINS
    patcher: str  # who wrote `forward` (or, for a swapped class, the class)
    missing: frozenset[str]  # attributes read on every path that the instance lacks: the call raises
    missing_guarded: frozenset[str]  # ones read behind a guard or branch that it lacks: it may fall back
    marker: object = None  # our patch marker, when origin is "ours"
    wrappers: tuple[Wrapper, ...] = ()  # outermost first
    swapped_for: type | None = None  # the library class a swapped-in class stands for
    first_missing: str = ""  # of `missing`, the one the call reads first: what its AttributeError names

    @property
    def foreign_wrappers(self) -> tuple[Wrapper, ...]:
        """Wrappers by others that call a forward they captured (not accelerate's hook, which looks it up)."""
        return tuple(w for w in self.wrappers if w.author != "adapter-doctor" and not w.hook)

    @property
    def described(self) -> str:
        """What runs, for messages: `func from module (origin by author)`, with its wrappers."""
        how = f"{name_of(innermost(self.forward))} ({self.origin.replace('-', ' ')} by {self.patcher})"
        if self.wrappers:
            how += ", wrapped by " + ", ".join(f"{w.name} ({w.author})" for w in self.wrappers)
        return how


@functools.lru_cache(maxsize=8)
def _package_dirs(count: int) -> dict[str, str]:
    """Directory -> package name for every imported package (re-read when sys.modules grows)."""
    out = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__path__", None)
        if not isinstance(path, (list, tuple)) and type(path).__name__ != "_NamespacePath":
            continue  # lazy or odd modules (torch's ops namespaces) are no folders of code
        for entry in list(path)[:1]:
            if isinstance(entry, str):
                out.setdefault(os.path.normcase(os.path.abspath(entry)), name)
    return out


def _package_of_file(filename: str) -> str | None:
    if not filename or filename.startswith("<"):
        return None
    dirs = _package_dirs(len(sys.modules))
    folder = os.path.normcase(os.path.abspath(os.path.dirname(filename)))
    while True:
        if folder in dirs:
            return dirs[folder]
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for marker in ("site-packages", "dist-packages"):  # a file of a package not imported by that name
        parts = filename.replace("\\", "/").split(f"/{marker}/")
        if len(parts) > 1:
            return parts[-1].split("/")[0].removesuffix(".py")
    return None


_PLUMBING = ("torch", "functools", "contextlib")  # generic decorators: the author is whoever they wrap


def author_of(func: Any) -> str:
    """Who wrote `func`, from the file its own code was compiled from: adapter-doctor, unsloth, trl, ..., or
    unknown (with the package or file). Exec'd code says which module's globals it runs in. A generic
    decorator (torch's `_disable_dynamo`, autocast) is looked through to what it wraps."""
    inner = unbound(func)
    for _ in range(8):
        author = _author_of_code(inner)
        wrapped = getattr(inner, "__wrapped__", None)
        if author not in _PLUMBING or wrapped is None:
            return author
        inner = unbound(wrapped)
    return _author_of_code(inner)


def _author_of_code(inner: Any) -> str:
    code = getattr(inner, "__code__", None)
    if code is None:  # a callable object: its class says who wrote it
        root = (type(inner).__module__ or "").split(".")[0]
        return _AUTHORS.get(root, f"unknown ({type(inner).__module__})")
    filename = code.co_filename
    if filename.startswith(_STDLIB):
        return (getattr(inner, "__globals__", {}).get("__name__") or "?").split(".")[0]
    package = _package_of_file(filename)
    if package is None and "unsloth_compiled_cache" in filename:
        package = "unsloth_compiled_cache"
    if package is None:
        where = getattr(inner, "__globals__", {}).get("__name__", "?")
        return f"unknown (code compiled from {filename or '?'} in {where})"
    root = package.split(".")[0]
    return _AUTHORS.get(root, f"unknown ({package})")


def name_of(func: Any) -> str:
    """module.qualname of `func`'s own code (wraps() copies __module__ and __qualname__ from what it wraps)."""
    inner = unbound(func)
    code = getattr(inner, "__code__", None)
    if code is None:  # a callable object: wraps() copied the names it carries, so name its class
        return f"{type(inner).__module__}.{type(inner).__qualname__}"
    module = getattr(inner, "__globals__", {}).get("__name__", "?")
    return f"{module}.{getattr(code, 'co_qualname', code.co_name)}"


def _class_forward(cls: type) -> Callable[..., Any] | None:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return vars(klass)["forward"]
    return None


def _inner(func: Any, module: Any) -> Any:
    """The callable a wrapper `func` calls through to, or None when `func` computes by itself.

    The wrapped forward is usually held in a closure cell (a bound method of `module`), else named by
    `__wrapped__` (functools.wraps).
    """
    cell = captured_cell(func, module)
    if cell is not None:
        return cell.cell_contents
    wrapped = getattr(func, "__wrapped__", None)
    return wrapped if callable(wrapped) else None


def captured_cell(wrapper: Any, module: Any) -> Any:
    """The one closure cell of `wrapper` that holds a bound method of `module` (the forward it calls), or None."""
    found = []
    for cell in getattr(unbound(wrapper), "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, types.MethodType) and value.__self__ is module:
            found.append(cell)
    return found[0] if len(found) == 1 else None


def accelerate_hooked(module: Any) -> bool:
    """accelerate's device hook: its forward calls whatever `module._old_forward` is at call time."""
    return getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__


def resolve(module: Any) -> tuple[tuple[Any, ...], Any, Any]:
    """(wrappers outermost first, the function that computes, the object it gets as self or None)."""
    wrappers: list[Any] = []
    hooked = accelerate_hooked(module)
    func = module.__dict__.get("_old_forward" if hooked else "forward")
    if hooked:
        wrappers.append(module.__dict__.get("forward"))  # accelerate's hook calls module._old_forward
    if func is None:
        return tuple(wrappers), _class_forward(type(module)), module
    bound = None
    class_forward = _class_forward(type(module))
    for _ in range(16):
        if isinstance(func, types.MethodType):
            bound, func = func.__self__, func.__func__
            continue
        if isinstance(func, functools.partial):
            if func.args and func.args[0] is module:
                bound = module
            func = func.func
            continue
        if func is class_forward or same_code(func, class_forward):
            break  # the class's own forward: its decorators are part of it
        inner = _inner(func, module)
        if inner is None:
            break
        wrappers.append(func)
        func, bound = inner, None
        if not isinstance(inner, (types.MethodType, functools.partial)):  # __wrapped__: an unbound function
            bound = module
    return tuple(w for w in wrappers if w is not None), func, bound


def library_class(module: Any) -> type:
    """The class a module had before any adapter-doctor patch (ours are generated subclasses)."""
    marker = getattr(type(module), MARKER, None)
    original = getattr(marker, "original", None)
    return original if isinstance(original, type) else type(module)


def forward_state(path: str, module: Any, parents: list[tuple[Any, str]] | None = None) -> ForwardState:
    """What `module` runs; `parents` are the (module, attribute) pairs that hold it, for swapped classes."""
    cls = type(module)
    marker = getattr(cls, MARKER, None)
    wrapper_funcs, func, bound = resolve(module)
    hook = module.__dict__.get("forward") if "_old_forward" in module.__dict__ else None
    wrappers = tuple(Wrapper(name_of(w), author_of(w), w is hook) for w in wrapper_funcs)
    own = library_class(module)
    class_level = bound is module and func is not None and same_code(func, _class_forward(cls))
    swapped = swapped_class(module, parents) if parents else None
    if func is None:
        origin = "library"
    elif class_level and marker is not None:
        origin = "ours"
    elif swapped is not None:
        origin = "swapped-class"
    elif is_library(func, own):
        origin = "library"
    else:
        origin = "class-patch" if class_level else "instance-patch"
    reads = SelfReads(frozenset(), frozenset())
    if origin not in ("library", "ours"):
        reads = self_reads(func) if bound is module else reads
    for w in reversed(wrapper_funcs):  # wrappers bound to the module read from it too, and before it
        if isinstance(w, types.MethodType) and w.__self__ is module:
            extra = self_reads(w)
            reads = SelfReads(reads.required | extra.required, reads.guarded | extra.guarded,
                              extra.order + tuple(n for n in reads.order if n not in extra.order))
    missing = frozenset(a for a in reads.required if not has_attr(module, a))
    missing_guarded = frozenset(a for a in reads.guarded if not has_attr(module, a))
    patcher = author_of(cls.forward if origin == "swapped-class" else func) if func is not None else "?"
    return ForwardState(path, own.__name__, func, origin, patcher, missing, missing_guarded,
                        marker if origin == "ours" else None, wrappers, swapped, reads.first_of(missing))


def has_attr(module: Any, name: str) -> bool:
    try:
        getattr(module, name)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001 - a property that fails for another reason still exists
        return True
    return True


def walk(model: Any) -> Iterator[tuple[str, Any, list[tuple[Any, str]]]]:
    """(first path, module, every (parent, attribute) holding it) for each distinct module of `model`: a
    module can sit in several places (a patcher's loader shares the rotary embedding with every layer)."""
    parents: dict[int, list[tuple[Any, str]]] = {}
    for _, module in model.named_modules():
        for name, child in module.named_children():
            parents.setdefault(id(child), []).append((module, name))
    for path, module in model.named_modules():
        yield path, module, parents.get(id(module), [])


def scan(model: Any) -> list[ForwardState]:
    """The state of every module whose forward is not its library's own, or is wrapped."""
    out = []
    for path, module, parents in walk(model):
        state = forward_state(path, module, parents)
        if state.origin != "library" or state.foreign_wrappers:
            out.append(state)
    return out


def is_foreign(state: ForwardState) -> bool:
    return state.origin in ("class-patch", "instance-patch", "swapped-class")


__all__ = ["ForwardState", "Wrapper", "author_of", "forward_state", "has_attr", "is_foreign", "library_class", "library_root",
           "name_of", "resolve", "scan", "walk", "captured_cell", "accelerate_hooked"]
