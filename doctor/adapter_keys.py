"""Parse saved adapter tensor names into (module path, role) and spot what training wrappers left in them.

On disk PEFT writes `base_model.model.<module path>.<role>[.weight|.bias]` with the adapter name
removed; wrappers (torch.compile, DDP, FSDP) and hand-rolled saves add prefixes or keep the name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from .user_regex import RANK_FORM, Matcher

BASE_PREFIX = "base_model.model."
LEADING_WRAPPERS = ("_orig_mod.", "module.")
INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
LORA_ROLES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_E")
_PARAMS = ("weight", "bias")
_PROMPT = re.compile(r"^(prompt_embeddings|prefix_task_cols|prefix_task_rows|prompt_encoder\..*)$")


@dataclass(frozen=True, slots=True)
class AdapterKey:
    name: str  # as stored
    canonical: str  # what PEFT expects on disk
    wrappers: tuple[str, ...]  # wrapper prefixes found, e.g. ("_orig_mod.",)
    has_base_prefix: bool
    module: str  # module path inside the base model, without PEFT's `.base_layer` nesting
    role: str  # a LORA_ROLES member, "full" (modules_to_save, saved embeddings, biases), "tokens", "prompt"
    param: str | None  # "weight", "bias" or None
    adapter_name: str | None  # an adapter name left inside the key
    nested: bool  # the module path ended in `.base_layer` (target_parameters nesting, targeted embeddings)


def _strip_wrappers(name: str) -> tuple[str, tuple[str, ...]]:
    found: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in LEADING_WRAPPERS:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
                found.append(prefix)
    for inner in INNER_WRAPPERS:
        if inner in name:
            name = name.replace(inner, "")
            found.append(inner)
    return name, tuple(dict.fromkeys(found))


def parse_key(name: str) -> AdapterKey:
    # Called once per tensor, and an adapter may have hundreds of thousands: the plain case is short.
    wrapped = name.startswith(LEADING_WRAPPERS) or "_wrapped_module." in name
    stripped, wrappers = _strip_wrappers(name) if wrapped else (name, ())
    has_prefix = stripped.startswith(BASE_PREFIX)
    body = stripped[len(BASE_PREFIX):] if has_prefix else stripped
    parts = body.split(".")
    if "lora_" in body:
        for role_at, part in enumerate(parts):
            if part in LORA_ROLES:
                return _lora_key(name, wrappers, has_prefix, parts, role_at)
    if _PROMPT.match(body):
        return AdapterKey(name, stripped, wrappers, has_prefix, "", "prompt", None, None, False)
    if len(parts) >= 3 and parts[-2] == "token_adapter":
        module = ".".join(parts[:-2])
        return AdapterKey(name, _canonical(body), wrappers, has_prefix, module, "tokens", None, None, False)
    param = parts[-1] if parts[-1] in _PARAMS else None
    module_parts = parts[:-1] if param else parts
    module, nested = _unnest(module_parts)
    return AdapterKey(name, _canonical(body), wrappers, has_prefix, module, "full", param, None, nested)


def _lora_key(name: str, wrappers: tuple[str, ...], has_prefix: bool, parts: list[str], role_at: int) -> AdapterKey:
    role, tail = parts[role_at], parts[role_at + 1:]
    if len(tail) == 1 and tail[0] in _PARAMS and role != "lora_magnitude_vector" and parts[role_at - 1:role_at] != ["base_layer"]:
        module = ".".join(parts[:role_at])  # the usual `<module>.lora_A.weight`: nothing to rewrite
        return AdapterKey(name, _canonical(".".join(parts)), wrappers, has_prefix, module, role, tail[0], None, False)
    param = tail[-1] if tail and tail[-1] in _PARAMS else None
    extra = tail[:-1] if param else tail
    adapter_name = ".".join(extra) if extra else None
    module, nested = _unnest(parts[:role_at])
    # DoRA's magnitude is stored without `.weight` on disk, whatever it is called in memory.
    keep_param = param if param and role != "lora_magnitude_vector" else None
    clean = parts[:role_at] + [role] + ([keep_param] if keep_param else [])
    return AdapterKey(name, _canonical(".".join(clean)), wrappers, has_prefix, module, role, param, adapter_name, nested)


def _unnest(parts: list[str]) -> tuple[str, bool]:
    nested = False
    while parts and parts[-1] == "base_layer":
        parts, nested = parts[:-1], True
    return ".".join(parts), nested


def _canonical(body: str) -> str:
    return BASE_PREFIX + body


MAX_SUFFIXES = 64  # real module paths have a dozen parts; a hostile name may have a million


def dot_suffixes(module: str, longest: int | None = None) -> Iterator[str]:
    """`module` and its parts after each `.`, from the right: what `module == t or
    module.endswith("." + t)` tests. Only the last MAX_SUFFIXES, and none longer than `longest`."""
    end = len(module)
    at = module.rfind(".")
    for _ in range(MAX_SUFFIXES):
        if at < 0:
            if longest is None or end <= longest:
                yield module
            return
        if longest is not None and end - at - 1 > longest:
            return
        yield module[at + 1:]
        at = module.rfind(".", 0, at)


def has_dot_suffix(module: str, names: frozenset[str], longest: int) -> bool:
    """`any(module == t or module.endswith("." + t) for t in names)`, with set lookups (`longest`: of names)."""
    if module in names:
        return True
    at = module.rfind(".")
    for _ in range(MAX_SUFFIXES):
        if at < 0 or len(module) - at - 1 > longest:
            return False
        if module[at + 1:] in names:
            return True
        at = module.rfind(".", 0, at)
    return False


class ParameterSelector:
    """PEFT's target_parameters match, at module level: `<module>.<param>` ends with an entry."""

    def __init__(self, target_parameters: object) -> None:
        entries = target_parameters if isinstance(target_parameters, list) else []
        self.owners = frozenset(t.rsplit(".", 1)[0] for t in entries if isinstance(t, str) and "." in t)
        self.longest = max(map(len, self.owners), default=0)

    def __call__(self, module: str) -> bool:
        return bool(self.owners) and has_dot_suffix(module, self.owners, self.longest)


def parameter_selected(module: str, target_parameters: object) -> bool:
    return ParameterSelector(target_parameters)(module)


class ModuleSelector:
    """PEFT's target_modules (or exclude_modules) match, built once per config value.

    A list matches a module by its name or a `.`-suffix; a string is a regex that PEFT runs with
    `re.fullmatch`, here under `matcher`'s budget. Answers None when the answer needs the base model
    (the `all-linear` shorthand) or the regex cannot be run (invalid, or over the budget).
    """

    def __init__(self, targets: object, matcher: Matcher | None = None) -> None:
        self.pattern = targets if isinstance(targets, str) and targets != "all-linear" else None
        self.names = frozenset(t for t in targets if isinstance(t, str)) if isinstance(targets, list) else None
        self.longest = max(map(len, self.names), default=0) if self.names else 0
        self.none = targets is None
        self.matcher = matcher or Matcher()

    def __call__(self, module: str) -> bool | None:
        if self.none:
            return False
        if self.names is not None:
            return has_dot_suffix(module, self.names, self.longest)
        if self.pattern is not None:
            try:
                return self.matcher.fullmatch(self.pattern, module)
            except re.error:
                return None
        return None


def module_selected(module: str, targets: object, matcher: Matcher | None = None) -> bool | None:
    """PEFT's target_modules match for one module (build a ModuleSelector to test many)."""
    return ModuleSelector(targets, matcher)(module)


def entry_names(entry: str, module: str) -> bool:
    """PEFT's rule for one target_modules (or target_parameters) list entry: the name itself or a `.`-suffix."""
    return has_dot_suffix(module, frozenset((entry,)), len(entry))


def pattern_value(patterns: object, module: str, default: object, matcher: Matcher | None = None) -> object | None:
    """What a rank_pattern or alpha_pattern gives `module`, as PEFT's get_pattern_key decides: the value of the
    first key `k` for which `re.match(rf"(.*\\.)?({k})$", module)` holds, else `default`. None when a key before
    the answer cannot be run within `matcher`'s budget. A key that does not compile (PEFT would raise) is read
    as a plain name."""
    matcher = matcher or Matcher()
    for key, value in (patterns.items() if isinstance(patterns, dict) else ()):
        if not isinstance(key, str):
            continue
        try:
            hit = matcher.match(RANK_FORM.format(key), module)
        except re.error:
            hit = entry_names(key, module)
        if hit is None:
            return None
        if hit:
            return value
    return default


def pattern_matches(key: str, modules: set[str], matcher: Matcher | None = None) -> bool:
    """Whether a rank_pattern or alpha_pattern key names any of `modules` (one it cannot run names none)."""
    return any(pattern_value({key: True}, m, False, matcher) for m in modules)
