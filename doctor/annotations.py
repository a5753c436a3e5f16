"""Does a JSON value fit a PEFT dataclass annotation such as `Optional[Union[list[str], str]]`?

Annotations are read as text from the knowledge table and walked with `ast`; nothing is evaluated.
Names this module does not know (PEFT's own sub-config classes) accept any value.
"""
from __future__ import annotations

import ast
from functools import lru_cache

# Lenient where Python is: PEFT computes with a whole float as with an int (lora_alpha=16.0), and
# tests a null bool as False. Only values that break or change behaviour fail to fit.
_SIMPLE = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool) or v is None,
    "dict": lambda v: isinstance(v, dict),
    "Dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "List": lambda v: isinstance(v, list),
    "tuple": lambda v: isinstance(v, list),  # JSON has no tuples
    "Tuple": lambda v: isinstance(v, list),
    "set": lambda v: isinstance(v, list),
    "None": lambda v: v is None,
    "NoneType": lambda v: v is None,
}


@lru_cache(maxsize=512)
def _parse(annotation: str) -> ast.expr | None:
    try:
        return ast.parse(annotation, mode="eval").body
    except SyntaxError:
        return None


def fits(value: object, annotation: str) -> bool:
    node = _parse(annotation)
    return True if node is None else _fits(value, node)


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):  # typing.Optional, t.List
        return node.attr
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # forward reference "X"
        return node.value
    return None


def _args(node: ast.expr) -> list[ast.expr]:
    return list(node.elts) if isinstance(node, ast.Tuple) else [node]


def _fits(value: object, node: ast.expr) -> bool:  # noqa: PLR0911 - one return per typing form
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _fits(value, node.left) or _fits(value, node.right)
    if isinstance(node, ast.Subscript):
        outer, args = _name(node.value), _args(node.slice)
        if outer == "Optional":
            return value is None or _fits(value, args[0])
        if outer == "Union":
            return any(_fits(value, a) for a in args)
        if outer == "Literal":
            return any(isinstance(a, ast.Constant) and a.value == value and type(a.value) is type(value) for a in args)
        if outer in ("list", "List", "set", "Set", "Sequence", "tuple", "Tuple"):
            if not isinstance(value, list):
                return False
            inner = args[0] if outer not in ("tuple", "Tuple") and args else None
            simple = _SIMPLE.get(inner.id) if isinstance(inner, ast.Name) else None
            if simple is not None:  # a list[str] may hold millions of entries
                return all(map(simple, value))
            return inner is None or all(_fits(v, inner) for v in value)
        if outer in ("dict", "Dict", "Mapping"):
            return isinstance(value, dict)
        return True
    name = _name(node)
    if name in _SIMPLE:
        return _SIMPLE[name](value)
    return True  # a PEFT class (LoftQConfig, ...) or Any: the JSON holds its dict form
