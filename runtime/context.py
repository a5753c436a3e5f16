"""What a patched forward knows besides `self`: its options, the kernel set, and the library's conventions.

Built once per generated class from the library class it replaces, so the per-call code reads plain fields
instead of inspecting signatures or versions.
"""
from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Context:
    options: Any  # the spec's options (runtime.options)
    kernels: Any  # adapter_doctor.kernels.KernelSet
    library: type  # the transformers class whose forward ours replaces
    library_forward: Callable[..., Any]  # its forward as the library defines it, whatever a patcher assigned
    positional: tuple[str, ...]  # its forward's parameter names after self, for positional calls
    returns_tuple: bool  # its forward returns (hidden_states, ...) rather than a tensor (gemma2 on 4.x)
    eager_attention: Callable[..., Any] | None  # its module's eager attention, the fallback interface


def context_for(library: type, options: Any, kernels: Any) -> Context:
    from .pristine import fresh_module, pristine_attr

    library_forward = pristine_attr(library, "forward") or library.forward
    try:
        signature = inspect.signature(inspect.unwrap(library_forward))
    except (TypeError, ValueError):
        signature = None
    positional: tuple[str, ...] = ()
    returns_tuple = False
    if signature is not None:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = tuple(p.name for p in signature.parameters.values() if p.kind in kinds)[1:]
        annotation = signature.return_annotation
        returns_tuple = annotation is tuple or typing.get_origin(annotation) is tuple
        returns_tuple = _returns_tuple(library_forward, returns_tuple)
    module = fresh_module(library.__module__) or sys.modules.get(library.__module__)
    eager = getattr(module, "eager_attention_forward", None)
    return Context(options, kernels, library, library_forward, positional, returns_tuple, eager)


def _returns_tuple(forward: Callable[..., Any], annotated: bool) -> bool:
    """Whether the forward's return statements build a tuple, read from its source: an annotation can say
    tuple where the code returns a tensor (Gemma3's decoder layer on transformers 5)."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(forward))))
    except (OSError, TypeError, SyntaxError):
        return annotated
    tuples = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple)
              for target in node.targets if isinstance(target, ast.Name)}
    returns = [node.value for node in ast.walk(tree) if isinstance(node, ast.Return) and node.value is not None]
    if not returns:
        return annotated
    return any(isinstance(v, ast.Tuple) or isinstance(v, ast.Name) and v.id in tuples for v in returns)


def named_arguments(ctx: Context, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` plus positional `args` named as the library's forward names them (after hidden_states)."""
    if not args:
        return kwargs
    names = ctx.positional[1:]
    if len(args) > len(names):
        raise TypeError(f"{ctx.library.__name__}.forward takes {len(names) + 1} positional arguments")
    return {**dict(zip(names, args)), **kwargs}
