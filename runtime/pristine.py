"""The library's own code, read afresh from its source files.

A patcher may replace a transformers or PEFT class's `forward` for the whole process, or swap a class at
module level, and need not keep the original anywhere. The source file on disk still holds it: executing a
fresh copy of the module (never registered in `sys.modules`, so nothing the process imports changes) gives
classes and functions exactly as the library defines them. Their imports resolve to the live package.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import itertools
import sys
import textwrap
import types
from typing import Any, Callable, Iterator

LIBRARIES = ("transformers", "peft")  # the packages whose classes patchers replace and we restore


def library_root(cls: type) -> str | None:
    root = (getattr(cls, "__module__", None) or "").split(".")[0]
    return root if root in LIBRARIES else None


@functools.cache
def fresh_module(name: str) -> types.ModuleType | None:
    """A new execution of module `name`'s source file, or None when it cannot be read or run."""
    live = sys.modules.get(name)
    origin = getattr(live, "__file__", None)
    if not origin or not origin.endswith(".py"):
        return None
    spec = importlib.util.spec_from_file_location(name, origin)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - a module that will not run twice simply has no pristine copy
        return None
    return module


def pristine_class(cls: type) -> type | None:
    """The class of the same qualified name in a fresh copy of `cls`'s library module."""
    if library_root(cls) is None:
        return None
    found: Any = fresh_module(cls.__module__)
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def pristine_attr(cls: type, name: str) -> Any:
    """`cls.<name>` as the libraries define it: the live MRO, each library class read from its fresh copy.

    Classes outside the libraries (torch.nn.Module, a user's subclass) count as they are. None when a library
    class on the way cannot be read afresh.
    """
    for klass in cls.__mro__:
        if library_root(klass) is None:
            if name in vars(klass):
                return vars(klass)[name]
            continue
        fresh = pristine_class(klass)
        if fresh is None:
            return None
        if name in vars(fresh):
            return vars(fresh)[name]
    return None


def unbound(func: Any) -> Any:
    """`func` itself after bound methods and partials; not what it wraps, whose names wraps() copied."""
    while isinstance(func, (types.MethodType, functools.partial)):
        func = func.__func__ if isinstance(func, types.MethodType) else func.func
    return func


def _chain(func: Any) -> Iterator[Any]:
    """`func` and each function it wraps (`__wrapped__`), each unbound."""
    for _ in range(32):
        func = unbound(func)
        yield func
        func = getattr(func, "__wrapped__", None)
        if func is None:
            return


def innermost(func: Any) -> Any:
    """Through bound methods, partials and `__wrapped__` to the function whose code runs."""
    *_, last = _chain(func)
    return last


def _fingerprint(func: Any) -> tuple[Any, ...] | None:
    codes = [getattr(f, "__code__", None) for f in _chain(func)]
    if not codes or any(c is None for c in codes):
        return None
    return tuple((c.co_filename, c.co_firstlineno, c.co_code, c.co_names) for c in codes)


def same_code(a: Any, b: Any) -> bool:
    """Whether two functions run the same source, decorators included (same files, lines and bytecode)."""
    fa = _fingerprint(a)
    return fa is not None and fa == _fingerprint(b)


def _quick_library(func: Callable[..., Any], owner: type) -> bool:
    """Defined in `owner`'s own module file under `owner`'s name: the library's, without a fresh copy."""
    inner = innermost(func)
    code = getattr(inner, "__code__", None)
    live = sys.modules.get(owner.__module__)
    return code is not None and code.co_filename == getattr(live, "__file__", None) \
        and getattr(inner, "__qualname__", None) == f"{owner.__qualname__}.{getattr(inner, '__name__', '')}"


def is_library(func: Callable[..., Any], cls: type, name: str = "forward") -> bool:
    """Whether `func` is `cls.<name>` as its library defines it (decorators included), judged against the
    nearest library class in `cls`'s MRO, so a patcher's subclass swapped into `__class__` is not the library.
    A class with no library class above it (torch.nn, a user's module) is taken as it is."""
    library = next((k for k in cls.__mro__ if library_root(k)), None)
    if library is None:
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        return owner is not None and same_code(func, vars(owner)[name])
    owner = next((k for k in library.__mro__ if name in vars(k)), None)
    if owner is not None and vars(owner)[name] is func and _quick_library(func, owner):
        return True
    pristine = pristine_attr(library, name)
    return pristine is not None and same_code(func, pristine)


def swapped_class(module: Any, parents: list[tuple[Any, str]]) -> type | None:
    """The library class that `module` stands in for, when a patcher swapped the class a parent builds: the
    class that parent's own `__init__` (read afresh) assigns to that attribute, which `module`'s class is not."""
    cls = type(module)
    own = (cls.__module__ or "").split(".")[0]
    if own == "torch" or any(library_root(k) for k in cls.__mro__):  # a library class, or a subclass of one
        return None
    for parent, name in parents:
        klass = next((k for k in type(parent).__mro__ if library_root(k) and "__init__" in vars(k)), None)
        built = _built_by_init(klass).get(name) if klass is not None else None
        found = getattr(fresh_module(klass.__module__), built, None) if built else None
        if isinstance(found, type) and found is not cls:
            return found
    return None


@functools.cache
def _built_by_init(cls: type) -> dict[str, str]:
    """attribute -> the module-level class name its `__init__` calls for it (self.x = Name(...))."""
    fresh = pristine_class(cls)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(vars(fresh)["__init__"])))
    except (TypeError, OSError, KeyError, SyntaxError):
        return {}
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                    out[target.attr] = node.value.func.id
    return out


def pristine_instance(cls: type, like: Any, config: Any) -> Any | None:
    """A new `cls(config=config)` on the device of `like`'s tensors, or None when it will not build that way."""
    import torch

    try:
        fresh = cls(config=config)
    except Exception:  # noqa: BLE001 - another constructor: nothing we can build safely
        return None
    tensor = next(itertools.chain(like.buffers(), like.parameters()), None) if isinstance(like, torch.nn.Module) \
        else None
    return fresh.to(tensor.device) if tensor is not None else fresh
