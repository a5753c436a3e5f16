"""LoRA pairs on 3-D expert parameters (`target_parameters`), as PEFT saves them: lora_A [r * experts, d].

Shared by the shape check that finds PEFT 0.17/0.18's in/out order and the fixer that swaps it back.
"""
from __future__ import annotations

from .adapter_keys import ParameterSelector, parse_key, pattern_value
from .user_regex import Matcher

SWAP_FIXED = "outin"  # the local version label `doctor fix` adds to the peft_version stamp once the factors are swapped


def expert_pairs(config: dict, names: list[str], shapes: dict[str, tuple[int, ...]],
                 matcher: Matcher | None = None) -> list[tuple[str, str, int]]:
    """(lora_A name, lora_B name, experts) of each LoRA pair on a 3-D target parameter."""
    selector = ParameterSelector(config.get("target_parameters"))
    out = []
    for name in names:
        key = parse_key(name)
        partner = name.replace(".lora_A.", ".lora_B.")
        if key.role != "lora_A" or partner == name or partner not in shapes or not selector(key.module):
            continue
        r = pattern_value(config.get("rank_pattern"), key.module, config.get("r"), matcher)
        a, b = shapes[name], shapes[partner]
        if (isinstance(r, int) and not isinstance(r, bool) and r > 0 and len(a) == 2 and len(b) == 2
                and a[0] % r == 0 and a[0] // r > 1 and b[1] == a[0]):
            out.append((name, partner, a[0] // r))
    return out
