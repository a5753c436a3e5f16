"""PEFT's matches of regular expressions written in adapter_config.json, in bounded time.

PEFT runs `re.fullmatch(target_modules, name)` and `re.match(rf"(.*\\.)?({key})$", name)` for
rank_pattern keys. Python's engine backtracks: `(a*)*b` takes time exponential in the length of the
name, and `.*a.*a.*a.*a` a high power of it. Before a pattern runs, `paths` bounds, from its parse
tree, the ways the engine can match it against a name of n characters. A match whose bound is over
the budget is not run and answers None (unknown); a pattern over it on any name a real model has is
pathological, which the config check reports.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

try:  # the parser behind re.compile, as re itself uses it
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_constants as _c
    import sre_parse as _sre

PER_MATCH = 1 << 24  # ways to match; at worst some tens of millions of steps of C
PER_ADAPTER = 1 << 27  # for all the matches one adapter's checks make (about a second)
PLAUSIBLE_NAME = 128  # characters: longer than any module path of a real model
RANK_FORM = r"(.*\.)?({})$"  # how PEFT embeds a rank_pattern or alpha_pattern key (re.match)

_SINGLE = {_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN}
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT} | ({_c.POSSESSIVE_REPEAT} if hasattr(_c, "POSSESSIVE_REPEAT") else set())


@lru_cache(maxsize=256)
def _parse(pattern: str) -> tuple[re.Pattern, Any] | None:  # Any: the parser's SubPattern
    try:
        return re.compile(pattern), _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return None


END = ""  # stands for the end of the string in a set of next characters


@lru_cache(maxsize=4096)
def paths(pattern: str, n: int, whole: bool = True) -> float:
    """An upper bound on the ways `pattern` can match at one position of an n-character string;
    `whole`: the match must reach the end of the string (re.fullmatch)."""
    parsed = _parse(pattern)
    if parsed is None:
        return 0.0
    tree = parsed[1]
    fold = bool(tree.state.flags & _c.SRE_FLAG_IGNORECASE)
    try:
        return _sequence(list(tree), n, fold, frozenset({END}) if whole else None)
    except RecursionError:
        return math.inf


def _sequence(items: list, n: int, fold: bool, follow: frozenset[str] | None) -> float:
    """`follow`: the characters that can come right after the sequence (None: any)."""
    total = 1.0
    for i, (op, av) in enumerate(items):
        after = _first_chars(items[i + 1], fold) if i + 1 < len(items) else follow
        if op in _REPEATS and _single(av[2]) and _disjoint(av[2], after, fold):
            continue  # X* followed by what X cannot match: only the longest run can go on
        total *= _node(op, av, n, fold, after)
        if total > 1e300:
            return math.inf
    return total


def _node(op, av, n: int, fold: bool, follow: frozenset[str] | None) -> float:  # noqa: PLR0911 - one per construct
    if op in _SINGLE or op is _c.AT:
        return 1.0
    if op is _c.SUBPATTERN:
        return _sequence(list(av[-1]), n, fold or bool(av[1] & _c.SRE_FLAG_IGNORECASE), follow)
    if op is _c.BRANCH:
        return sum(_sequence(list(alt), n, fold, follow) for alt in av[1])
    if op in _REPEATS:
        return _repeat(av[0], av[1], av[2], n, fold, follow)
    if op in (_c.ASSERT, _c.ASSERT_NOT):  # run again at every attempt: its work multiplies
        return 1.0 + _sequence(list(av[1]), n, fold, None)
    if op is _c.GROUPREF:
        return n + 1.0
    if op is _c.GROUPREF_EXISTS:
        return _sequence(list(av[1]), n, fold, follow) + (_sequence(list(av[2]), n, fold, follow) if av[2] else 1.0)
    if getattr(_c, "ATOMIC_GROUP", None) is op:
        return _sequence(list(av), n, fold, None)
    return math.inf  # a construct this bound does not know: never run it unbounded


def _repeat(lo: int, hi: int, body, n: int, fold: bool, follow: frozenset[str] | None) -> float:
    items = list(body)
    start = _first_chars(items[0], fold) if items else None
    # Within a round, the end of the body is followed by the next round or by what follows the repeat.
    inner = _sequence(items, n, fold, None if start is None or follow is None else start | follow)
    k = n + 1 if hi == _c.MAXREPEAT else min(hi, n + 1)  # more non-empty rounds than characters cannot fit
    if k < lo:
        return 1.0
    if inner <= 1.0:
        return k - lo + 1.0
    if body.getwidth()[0] == 0 or k * math.log(inner) > 690:
        return math.inf  # rounds that may match nothing, or e**690: exponential in the name's length
    return (k - lo + 1.0) * inner ** k


def _single(body) -> bool:
    items = list(body)
    return len(items) == 1 and items[0][0] in _SINGLE


def _disjoint(body, after: frozenset[str] | None, fold: bool) -> bool:
    """Can no character matched by the one-character `body` be what comes after it?"""
    if after is None:
        return False
    op, av = list(body)[0]
    if op is _c.LITERAL:
        return not (fold and _cased(chr(av))) and chr(av) not in after
    if op is _c.IN and all(o in (_c.LITERAL, _c.RANGE, _c.CATEGORY) for o, _ in av):
        if fold and any(o is not _c.CATEGORY for o, _ in av):
            return False
        return not any(ch != END and _in_set(ch, av) for ch in after)
    return False


def _cased(ch: str) -> bool:
    return ch.lower() != ch or ch.upper() != ch or ch.isalpha()


def _first_chars(item, fold: bool) -> frozenset[str] | None:
    """The characters the item can start with, when it must consume one and they are few; else None."""
    op, av = item
    chars: set[str] = set()
    if op is _c.LITERAL:
        chars.add(chr(av))
    elif op is _c.IN and all(o in (_c.LITERAL, _c.RANGE) for o, _ in av):
        for o, a in av:
            span = range(a, a + 1) if o is _c.LITERAL else range(a[0], a[1] + 1)
            if len(span) > 256:
                return None
            chars.update(map(chr, span))
    elif op is _c.AT and av in (_c.AT_END, _c.AT_END_STRING):
        return frozenset({END, "\n"}) if av is _c.AT_END else frozenset({END})
    elif op is _c.SUBPATTERN and not av[1] and list(av[-1]):
        return _first_chars(list(av[-1])[0], fold)
    elif op is _c.BRANCH:
        alts = [_first_chars(list(alt)[0], fold) if list(alt) else None for alt in av[1]]
        return None if None in alts else frozenset[str]().union(*(a for a in alts if a is not None))
    elif op in _REPEATS and av[0] >= 1 and list(av[2]):
        return _first_chars(list(av[2])[0], fold)
    else:
        return None
    return None if fold and any(map(_cased, chars)) else frozenset(chars)


_CATEGORIES = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    _c.CATEGORY_SPACE: str.isspace,
}


def _in_set(ch: str, items: list) -> bool:
    """Does the class [items] match `ch`? Unknown categories count as matching (the safe answer)."""
    for op, av in items:
        if op is _c.LITERAL and chr(av) == ch or op is _c.RANGE and av[0] <= ord(ch) <= av[1]:
            return True
        if op is _c.CATEGORY and _CATEGORIES.get(av, lambda _: True)(ch):
            return True
    return False


@lru_cache(maxsize=256)
def pathological(pattern: str, whole: bool = True) -> str | None:
    """Why PEFT's engine could take unbounded time on `pattern` with a real module name, or None."""
    bound = paths(pattern, PLAUSIBLE_NAME, whole)
    if bound <= PER_MATCH:
        return None
    if bound > 1e300 or paths(pattern, 2 * PLAUSIBLE_NAME, whole) > bound * 2.0**12:
        return "a repeated group can match the same text in many ways: matching takes time exponential in the name"
    return f"up to {bound:.1e} ways to match a {PLAUSIBLE_NAME}-character name: backtracking of a high power of its length"


_REGEX_SYNTAX = re.compile(r"[\\^$*+?{}\[\]|()]")  # a key without these is a plain name (dots aside)


def pathological_keys(patterns: object, limit: int | None = None) -> list[tuple[str, str]]:
    """The rank_pattern or alpha_pattern keys that PEFT's `re.match(RANK_FORM)` could run unbounded on, with why;
    of the first `limit` keys with regex syntax (each costs a parse), else of all of them."""
    keys = [k for k in patterns if isinstance(k, str) and _REGEX_SYNTAX.search(k)] if isinstance(patterns, dict) else []
    return [(k, why) for k in keys[:limit] if (why := pathological(RANK_FORM.format(k), whole=False))]


class Matcher:
    """Runs user patterns under one budget for an adapter. A match over the budget answers None;
    a pattern that does not compile raises re.error, as it does in PEFT."""

    CALL = 64.0  # what one call costs beyond its paths: Python's overhead, in the same units
    COMPILE = 16384.0  # what reading a new pattern costs (compiling and bounding it)

    def __init__(self, budget: float = PER_ADAPTER) -> None:
        self.left = budget
        self._compiled: dict[str, re.Pattern | None] = {}
        self._paths: dict[tuple[str, int, bool], float] = {}

    def fullmatch(self, pattern: str, name: str) -> bool | None:
        compiled = self._admit(pattern, name, True)
        return None if compiled is None else compiled.fullmatch(name) is not None

    def match(self, pattern: str, name: str) -> bool | None:
        compiled = self._admit(pattern, name, False)
        return None if compiled is None else compiled.match(name) is not None

    def _admit(self, pattern: str, name: str, whole: bool) -> re.Pattern | None:
        if pattern not in self._compiled:
            if self.left < self.COMPILE:
                return None
            self.left -= self.COMPILE
            parsed = _parse(pattern)
            self._compiled[pattern] = None if parsed is None else parsed[0]
        compiled = self._compiled[pattern]
        if compiled is None:
            raise re.error(f"invalid pattern {pattern[:60]!r}")
        key = (pattern, len(name), whole)
        cost = self._paths.get(key)
        if cost is None:
            cost = self._paths[key] = paths(pattern, len(name), whole) + self.CALL
        if cost > PER_MATCH or cost > self.left:
            return None
        self.left -= cost
        return compiled
