"""Parse saved adapter tensor names into (module path, role) and spot what training wrappers left in them.

On disk PEFT writes `base_model.model.<module path>.<role>[.weight|.bias]` with the adapter name
removed; wrappers (torch.compile, DDP, FSDP) and hand-rolled saves add prefixes or keep the name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

BASE_PREFIX = "base_model.model."
LEADING_WRAPPERS = ("_orig_mod.", "module.")
INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
LORA_ROLES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_E")
_PARAMS = ("weight", "bias")
_PROMPT = re.compile(r"^(prompt_embeddings|prefix_task_cols|prefix_task_rows|prompt_encoder\..*)$")


@dataclass(frozen=True)
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
    stripped, wrappers = _strip_wrappers(name)
    has_prefix = stripped.startswith(BASE_PREFIX)
    body = stripped[len(BASE_PREFIX):] if has_prefix else stripped
    parts = body.split(".")
    role_at = next((i for i, p in enumerate(parts) if p in LORA_ROLES), None)
    if role_at is not None:
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


def parameter_selected(module: str, target_parameters: object) -> bool:
    """PEFT's target_parameters match, at module level: `<module>.<param>` ends with an entry."""
    if not isinstance(target_parameters, list):
        return False
    owners = {t.rsplit(".", 1)[0] for t in target_parameters if isinstance(t, str) and "." in t}
    return any(module == o or module.endswith("." + o) for o in owners)


def module_selected(module: str, targets: object) -> bool | None:
    """PEFT's target_modules match: exact or `.name` suffix for a list; `re.fullmatch` for a string.

    Returns None when the answer needs the base model (the `all-linear` shorthand, a bad regex).
    """
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets == "all-linear":
            return None
        try:
            return re.fullmatch(targets, module) is not None
        except re.error:
            return None
    if isinstance(targets, list):
        return any(isinstance(t, str) and (module == t or module.endswith("." + t)) for t in targets)
    return None
