"""The checkpoint renames transformers 5 applies on load, per architecture, from `knowledge/transformers_renames.json`.

transformers 5 builds some models with new module names (ViT's `encoder.layer.N.attention.attention.query` is
`layers.N.attention.q_proj` since 5.9) and renames checkpoint keys on load. PEFT matches `target_modules` and
adapter keys against the names in memory, so an adapter written with the old names can match nothing. This module
replays transformers' renamings on names without importing transformers, and `verdict` judges what they do to one
adapter (ADC518; `Context.renames` holds it, so every check reads the same one).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from packaging.version import Version

from .adapter_keys import ModuleSelector
from .user_regex import Matcher

_TABLE = Path(__file__).parent / "knowledge" / "transformers_renames.json"
LEGACY = "legacy"  # transforms transformers applies to every model


@lru_cache(maxsize=1)
def table() -> dict:
    with open(_TABLE, encoding="utf-8") as fh:
        return json.load(fh)


def newest_release() -> str:
    """The newest transformers release the table was read from: the layout judged when none is known."""
    return table()["releases"][-1]


@dataclass(frozen=True)
class Transform:
    kind: str  # "rename", "convert" (tensors merged or split) or "opaque" (not followed)
    regex: re.Pattern[str] | None
    dst: str = ""


@dataclass(frozen=True)
class Scoped:
    """One architecture's transforms, as transformers scopes a sub-model's: under its attribute path."""

    key: str  # the class name or model_type they are registered under
    since: str  # the release these transforms were first read in
    transforms: tuple[Transform, ...]
    scope: str | None = None  # None for the root model
    prefix: str = ""  # the root's base_model_prefix


@dataclass(frozen=True)
class Renaming:
    old: str
    new: str
    exact: bool  # renamings only: no merged, split or unfollowed tensor on the way


_BACKREF = re.compile(r"\\(\d+)")  # \N in a target: the matched branch's Nth group


def _compiled(rule: dict) -> Transform:
    if "src" in rule:
        wanted = max((int(n) for n in _BACKREF.findall(rule["dst"])), default=0)
        if any(re.compile(p).groups < wanted for p in rule["src"]):
            return Transform("opaque", None)  # a branch without that group: transformers fails on such a key
        return Transform("rename", re.compile("|".join(f"(?P<g{i}>{p})" for i, p in enumerate(rule["src"]))), rule["dst"])
    if "convert" in rule:
        return Transform("convert", re.compile("|".join(f"(?:{p})" for p in rule["convert"])))
    return Transform("opaque", None)


@lru_cache(maxsize=512)
def _rule_set(set_id: str) -> tuple[Transform, ...]:
    return tuple(_compiled(r) for r in table()["rule_sets"][set_id])


def _at(key: str, tf: Version) -> tuple[str, tuple[Transform, ...]] | None:
    """The transforms registered under `key` in release `tf`, with the release they were first read in."""
    found = None
    for since, set_id in table()["keys"].get(key, []):
        if Version(since) <= tf:
            found = (since, set_id)
    if found is None or found[1] is None:
        return None
    return found[0], _rule_set(found[1])


def transforms_for(config: dict, tf: Version) -> list[Scoped]:
    """What transformers `tf` applies to the checkpoint keys of the model `config` describes (class name first,
    then model_type, then each sub-model's class, then the legacy renames), in its order."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    arch, model_type = (archs[0] if archs else None), config.get("model_type")
    out: list[Scoped] = []
    root_key = next((k for k in (arch, model_type) if isinstance(k, str) and _at(k, tf)), None)
    if root_key is not None:
        since, transforms = _at(root_key, tf)  # type: ignore[misc]
        out.append(Scoped(root_key, since, transforms))
    sub = table()["submodels"].get(arch or "", {})
    for attr, child in sub.get("children", []):
        found = _at(child, tf) if child != root_key else None
        if found:
            scope = attr.removeprefix(sub["prefix"]).removeprefix(".")
            out.append(Scoped(child, found[0], found[1], scope, sub["prefix"]))
    legacy = _at(LEGACY, tf)
    if legacy:
        out.append(Scoped(LEGACY, legacy[0], legacy[1]))
    return out


def _scoped_part(key: str, scoped: Scoped) -> tuple[str, str] | None:
    """(prefix consumed, rest to match), as transformers' `_scoped_match` splits a key."""
    if scoped.scope is None:
        return "", key
    scope = f"{scoped.scope}." if scoped.scope else ""
    base = f"{scoped.prefix}." if scoped.prefix else ""
    for prefix in (base + scope, scope):
        if key.startswith(prefix):
            return prefix, key[len(prefix):]
    return None


def _apply(transform: Transform, key: str, scoped: Scoped) -> str | None:
    """The renamed key, or None when `transform` does not match it."""
    split = _scoped_part(key, scoped)
    regex = transform.regex
    match = regex.search(split[1]) if split and regex else None
    if match is None or split is None or regex is None:
        return None
    if transform.kind != "rename":
        return key
    # A branch's own groups follow its named group: `(?P<g0>...)|(?P<g1>...)` numbers g1's first group after g1.
    start = regex.groupindex[next(name for name, value in match.groupdict().items() if value is not None)]
    dst = _BACKREF.sub(lambda ref: match.group(start + int(ref.group(1))) or "", transform.dst)
    rest = split[1]
    return split[0] + rest[:match.start()] + dst + rest[match.end():]  # the match, not the first text equal to it


def rename_key(key: str, scopes: list[Scoped]) -> Renaming:
    """A checkpoint key as transformers names it in memory: every renaming in turn, then at most one converter."""
    new, exact = key, True
    renames = [(t, s) for s in scopes for t in s.transforms if t.kind == "rename"]
    for transform, scoped in renames:
        new = _apply(transform, new, scoped) or new
    for transform, scoped in ((t, s) for s in scopes for t in s.transforms if t.kind == "convert"):
        if _apply(transform, new, scoped) is not None:
            exact = False
            break
    return Renaming(key, new, exact)


def rename_module(module: str, scopes: list[Scoped]) -> Renaming:
    """A module path as transformers names it in memory, judged by its weight's key. A module whose weight is
    merged, split or moved off `.weight` keeps its old name, not exact: what it becomes is not followed."""
    renamed = rename_key(module + ".weight", scopes)
    if renamed.exact and renamed.new.endswith(".weight"):
        return Renaming(module, renamed.new.removesuffix(".weight"), True)
    return Renaming(module, module, False)


def renames_modules(scopes: list[Scoped]) -> bool:
    """True when an architecture's own transforms apply: the legacy ones rename parameters (`LayerNorm.gamma`,
    `weight_g`) and a VLM prefix that VLMs' own mapping covers, never a module of another model, so a model with
    only those is not walked name by name."""
    return any(s.key != LEGACY for s in scopes)


def followed(scopes: list[Scoped]) -> bool:
    """True when every transform is one replayed here: a set with an unfollowed one is not judged."""
    return all(t.kind != "opaque" for s in scopes for t in s.transforms)


@dataclass(frozen=True)
class RenameVerdict:
    """What the renames do to one adapter: the moved modules, and whether targets and keys still reach them."""

    scopes: list[Scoped]
    renamed: list[Renaming]  # adapter modules whose name changes, exactly
    unselected: list[Renaming]  # of those, the ones target_modules no longer selects
    nothing_selected: bool  # target_modules selects no module at all: PEFT raises
    keys_renamed_by_peft: bool | None  # None: the base's model_type is unknown (no config.json found)
    since: str  # the first release read that renames the first of them so
    model_modules: list[str]  # the module names the model will have, as judged

    @property
    def broken(self) -> bool:
        return bool(self.unselected) or self.keys_renamed_by_peft is False

    @property
    def reported(self) -> frozenset[str]:
        """The adapter modules that ADC518 reports as renamed (ADC514 leaves them to it)."""
        return frozenset(r.old for r in self.renamed) if self.broken else frozenset()


def verdict(model: dict, config: dict, modules: list[str], base_modules: list[str] | None, tf: Version,
            peft_converts: bool, matcher: Matcher) -> RenameVerdict | None:
    """The renames' effect on an adapter of `modules` with `config`, on the model `model` describes as
    transformers `tf` builds it (`base_modules`: the base's module names, None without its config.json;
    `peft_converts`: the target PEFT renames keys for registered model types). None when no renaming applies,
    a transform is not followed, or target_modules cannot be run (all-linear, a regex over the budget)."""
    scopes = transforms_for(model, tf)
    if not renames_modules(scopes) or not followed(scopes):
        return None
    every = [rename_module(m, scopes) for m in modules]
    renamed = [r for r in every if r.exact and r.new != r.old]
    targets = config.get("target_modules")
    if not renamed or targets is None:
        return None
    names = _universe(base_modules, every)
    answers = _answers(config, names, matcher)
    if answers is None:
        return None
    unselected = [r for r in renamed if not answers[r.new]]  # every renamed name is in the universe
    nothing = _nothing(config, answers)
    keys_ok = None if base_modules is None else peft_converts and _registered(model.get("model_type"), tf)
    return RenameVerdict(scopes, renamed, unselected, nothing, keys_ok, _first_renaming(model, renamed[0]), names)


@dataclass(frozen=True)
class NewerNames:
    """Adapter modules named as a later transformers builds the model, judged on a release that builds the old
    names: each Renaming's `old` is the adapter's name, `new` the module the target release builds."""

    arch: str  # the class name or model_type the renames are registered under
    renamed: list[Renaming]
    since: str  # the first release read that builds the adapter's names
    model_modules: list[str]  # the module names the model will have, as judged
    nothing_selected: bool | None  # target_modules selects no module: PEFT raises (None: it cannot be run)


def newer_names(model: dict, config: dict, modules: list[str], base_modules: list[str], tf: Version,
                matcher: Matcher) -> NewerNames | None:
    """The reverse of `verdict`: adapter `modules` that the base, as transformers `tf` builds it, lacks, and that
    the newest release read names one of its modules. None when there are none or the renames are not followed.
    It needs the base's module names: a base known by its config alone names none (ADC518 does not need them)."""
    present = set(base_modules)
    newest = Version(newest_release())
    later = transforms_for(model, newest) if tf < newest and not present.issuperset(modules) else []
    if not renames_modules(later) or not followed(later):
        return None
    back: dict[str, str] = {}
    for name in base_modules:
        r = rename_module(name, later)
        if r.exact and r.new not in present:
            back.setdefault(r.new, name)
    found = [Renaming(m, back[m], True) for m in modules if m not in present and m in back]
    if not found:
        return None
    arch = next(s.key for s in later if s.key != LEGACY)
    since = _first_renaming(model, Renaming(found[0].new, found[0].old, True))
    names = sorted(present)
    answers = _answers(config, names, matcher)
    return NewerNames(arch, found, since, names, None if answers is None else _nothing(config, answers))


def _answers(config: dict, names: list[str], matcher: Matcher) -> dict[str, bool] | None:
    """target_modules' answer for each of `names`; None where it cannot be run (all-linear, a regex over the
    budget) or is missing."""
    targets = config.get("target_modules")
    if targets is None:
        return None
    selector = ModuleSelector(targets, matcher)
    answers = {name: selector(name) for name in names}
    return None if None in answers.values() else {name: bool(a) for name, a in answers.items()}


def _nothing(config: dict, answers: dict[str, bool]) -> bool:
    # PEFT raises when target_modules selects no module, unless target_parameters adapts some
    return not any(answers.values()) and not config.get("target_parameters")


def _universe(base_modules: list[str] | None, every: list[Renaming]) -> list[str]:
    """The module names the model will have: the base's, else what the adapter's own modules become."""
    return sorted(set(base_modules or ()) | {r.new for r in every if r.exact})


def _registered(model_type: object, tf: Version) -> bool:
    # PEFT asks transformers for the mapping registered under the base's model_type, not its class name.
    return isinstance(model_type, str) and any(s.key == model_type for s in transforms_for({"model_type": model_type}, tf))


def _first_renaming(config: dict, renaming: Renaming) -> str:
    for release in table()["releases"]:
        if rename_module(renaming.old, transforms_for(config, Version(release))).new == renaming.new:
            return release
    return table()["releases"][-1]
