"""Which attributes a function reads from its first argument, and whether a missing one must raise.

A read "must raise" when the instance lacks the attribute and every normal path through the function passes
the read (it dominates every return), outside any `try` that catches AttributeError. Anything else, a read
behind `hasattr`, `getattr(self, name, default)`, an `if`, a loop body, a nested function or a `try`, may be
skipped at run time, so it is reported as guarded: the forward may fall back, not certainly fail.

The analysis is of bytecode, so it also covers functions without source (exec'd rewrites).
"""
from __future__ import annotations

import dis
import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

_LOAD_SELF = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_DEREF", "LOAD_FAST_BORROW"}
_LOAD_ATTR = {"LOAD_ATTR", "LOAD_METHOD"}
_RETURNS = {"RETURN_VALUE", "RETURN_CONST"}
_ENDS = _RETURNS | {"RAISE_VARARGS", "RERAISE"}
_JUMPS = {"JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_ABSOLUTE", "JUMP", "JUMP_BACKWARD_NO_INTERRUPT",
          "JUMP_NO_INTERRUPT"}
_CATCHING = {"AttributeError", "Exception", "BaseException"}
_JUMP_OPS = set(dis.hasjrel) | set(dis.hasjabs)


@dataclass(frozen=True)
class SelfReads:
    required: frozenset[str]  # read on every path, unguarded: a missing one raises AttributeError
    guarded: frozenset[str]  # read only on some paths, or behind hasattr / getattr default / try
    order: tuple[str, ...] = ()  # the required ones in the order the code first reads them

    def first_of(self, names: frozenset[str]) -> str:
        """Of `names`, the one a call reads first: the attribute its AttributeError will name."""
        return next((n for n in self.order if n in names), min(names, default=""))


def self_reads(func: Callable[..., Any], depth: int = 0) -> SelfReads:
    """The attributes `func` reads from its first parameter, including those of the functions it calls
    through its closure (decorators, gates): required only where that call itself happens on every path."""
    from .pristine import unbound

    func = unbound(func)
    code = getattr(func, "__code__", None)
    if code is None:
        return SelfReads(frozenset(), frozenset())
    own = _reads(code) if code.co_argcount else SelfReads(frozenset(), frozenset())
    required, guarded, order = set(own.required), set(own.guarded), list(own.order)
    for name, cell in zip(code.co_freevars, getattr(func, "__closure__", None) or ()):
        callee = _cell_function(cell)
        if callee is None or depth > 4:
            continue
        inner = self_reads(callee, depth + 1)
        if _calls_on_every_path(code, name):
            required |= inner.required
            guarded |= inner.guarded
            order += [n for n in inner.order if n not in order]
        else:  # one of several callees (a gate choosing fast or original): none is certain to run
            guarded |= inner.required | inner.guarded
    return SelfReads(frozenset(required), frozenset(guarded - required), tuple(order))


def _cell_function(cell: Any) -> Any:
    try:
        value = cell.cell_contents
    except ValueError:
        return None
    return value if isinstance(value, types.FunctionType) else None


@functools.lru_cache(maxsize=1024)
def _calls_on_every_path(code: types.CodeType, name: str) -> bool:
    flow = _Flow(code)
    loads = [i for i, op in enumerate(flow.ins) if op.opname in ("LOAD_DEREF", "LOAD_CLOSURE") and op.argval == name]
    return any(flow.must_pass(i) for i in loads)


@functools.lru_cache(maxsize=1024)
def _reads(code: types.CodeType) -> SelfReads:
    """Per code object: a model has thousands of modules but a handful of distinct forwards."""
    me = code.co_varnames[0]
    flow = _Flow(code)
    required: dict[str, None] = {}  # ordered: the first read first
    guarded: set[str] = set()
    checked: set[str] = set()  # hasattr(self, "x"): every read of x is then guarded
    stored: set[str] = set()  # self.x = ... in the forward itself: it does not rely on the instance
    for i, op in enumerate(flow.ins[:-1]):
        if op.opname not in _LOAD_SELF or op.argval != me:
            continue
        nxt = flow.ins[i + 1]
        if nxt.opname in _LOAD_ATTR:
            name = str(nxt.argval)
            if flow.must_pass(i):
                required.setdefault(name)
            else:
                guarded.add(name)
        elif nxt.opname == "STORE_ATTR":
            stored.add(str(nxt.argval))
        elif guard := _guard_call(flow.ins, i):
            kind, name = guard
            if kind == "hasattr":
                checked.add(name)
            elif kind == "getattr" and flow.must_pass(i):
                required.setdefault(name)  # getattr(self, "x") without a default raises like self.x
            else:
                guarded.add(name)
    for sub in _nested(code):  # closures and comprehensions may never run: their reads are guarded
        inner = _reads_nested(sub, me)
        guarded |= inner
    order = tuple(n for n in required if n not in checked | stored)
    return SelfReads(frozenset(order), frozenset((guarded | checked) - set(order) - stored), order)


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield const
            yield from _nested(const)


def _reads_nested(code: types.CodeType, me: str) -> set[str]:
    if me not in code.co_freevars and me not in code.co_varnames:
        return set()
    ins = list(dis.get_instructions(code))
    return {str(ins[i + 1].argval) for i, op in enumerate(ins[:-1])
            if op.opname in _LOAD_SELF and op.argval == me and ins[i + 1].opname in _LOAD_ATTR}


def _guard_call(ins: list[dis.Instruction], i: int) -> tuple[str, str] | None:
    """("getattr"|"getattr-default"|"hasattr", name) when `self` is the first argument of such a call with a
    string constant second."""
    before = next((op for op in reversed(ins[:i]) if op.opname not in ("PUSH_NULL", "PRECALL")), None)
    name = str(before.argval).removeprefix("NULL + ").removesuffix(" + NULL") \
        if before is not None and before.opname in ("LOAD_GLOBAL", "LOAD_NAME") else ""
    after = ins[i + 1]
    if name not in ("getattr", "hasattr") or after.opname != "LOAD_CONST" or not isinstance(after.argval, str):
        return None
    call = ins[i + 2] if i + 2 < len(ins) else None
    with_default = name == "getattr" and not (call is not None and call.opname in ("CALL", "PRECALL", "CALL_FUNCTION")
                                              and call.arg == 2)
    return ("getattr-default" if with_default else name), after.argval


class _Flow:
    """The control flow of one code object, by instruction index."""

    def __init__(self, code: types.CodeType) -> None:
        self.ins = list(dis.get_instructions(code))
        self.index = {op.offset: i for i, op in enumerate(self.ins)}
        self.handlers = _exception_entries(code)

    def _successors(self, i: int) -> list[int]:
        op = self.ins[i]
        if op.opname in _ENDS:
            return []
        target = self.index.get(op.argval) if op.opcode in _JUMP_OPS and isinstance(op.argval, int) else None
        if op.opname in _JUMPS:
            return [target] if target is not None else []
        out = [i + 1] if i + 1 < len(self.ins) else []
        return out + ([target] if target is not None else [])

    def must_pass(self, i: int) -> bool:
        """Whether every path from the entry to a return passes instruction i, outside a catching `try`."""
        if self._caught(i):
            return False
        seen, todo = {i}, [0]
        while todo:
            j = todo.pop()
            if j in seen:
                continue
            seen.add(j)
            if self.ins[j].opname in _RETURNS:
                return False  # returned without passing i
            todo.extend(self._successors(j))
        return True

    def _caught(self, i: int, depth: int = 0) -> bool:
        """Whether an AttributeError raised at instruction i lands in an `except` that catches it."""
        offset = self.ins[i].offset
        entry = next((e for e in self.handlers if e[0] <= offset < e[1]), None)
        if entry is None or depth > 8:
            return False
        start = self.index.get(entry[2])
        if start is None:
            return False
        names: set[str] = set()
        clause_start, j = True, start + 1  # start is PUSH_EXC_INFO
        while j < len(self.ins):
            op = self.ins[j]
            if op.opname == "WITH_EXCEPT_START":  # a with block's exit: re-raised to whatever encloses it
                return self._caught(j, depth + 1)
            if op.opname in _ENDS:
                return False  # a finally or a cleanup, which re-raises
            if op.opname == "POP_TOP" and clause_start and not names:
                return True  # a bare except
            if op.opname == "CHECK_EXC_MATCH":
                if names & _CATCHING:
                    return True
                jump = self.ins[j + 1] if j + 1 < len(self.ins) else None  # to the next except clause
                if jump is None or self.index.get(jump.argval) is None:
                    return False
                names, clause_start, j = set(), True, self.index[jump.argval]
                continue
            if op.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_ATTR"):
                names.add(str(op.argval))
            clause_start = False
            j += 1
        return False


def _exception_entries(code: types.CodeType) -> list[tuple[int, int, int]]:
    """(start, end, handler) offsets of the exception table (Python 3.11+; earlier ones have none)."""
    entries = getattr(dis.Bytecode(code), "exception_entries", None)
    if entries is None:
        return []
    return [(e.start, e.end, e.target) for e in entries]
