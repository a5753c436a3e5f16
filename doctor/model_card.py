"""The parts of a PEFT model card (README.md) that say something about the adapter.

Only the YAML front matter's top-level scalars and simple lists are read, with a tiny parser, so
that checking needs no YAML library. PEFT's card template also ends with a "Framework versions"
list (`- PEFT 0.10.0`), which is the only version hint an unstamped adapter may carry.
"""
from __future__ import annotations

import re
from pathlib import Path

# [ \t], not \s: \s also matches newlines, and `^\s*-` retried at every line of a blank file is quadratic.
_PEFT_LINE = re.compile(r"^[ \t]*-[ \t]*PEFT[ \t]+([0-9][0-9A-Za-z.+\-]*)[ \t]*\r?$", re.M)
_MAX_CARD = 1 << 20


def read_front_matter(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            text = fh.read(_MAX_CARD).decode("utf-8", "replace")
    except OSError:
        return None
    return parse_card(text)


def parse_card(text: str) -> dict:
    card: dict = {}
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
        if end is not None:
            card = _parse_simple_yaml(lines[1:end])
    versions = _PEFT_LINE.findall(text)
    if versions:
        card["_peft_version"] = versions[-1]
    return card


def _parse_simple_yaml(lines: list[str]) -> dict:
    out: dict = {}
    key = None
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] not in " \t-" and ":" in line:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            out[key] = _scalar_or_inline_list(value) if value else []
        elif key is not None and line.lstrip().startswith("- ") and isinstance(out.get(key), list):
            out[key].append(_scalar(line.lstrip()[2:].strip()))
    return out


def _scalar_or_inline_list(value: str) -> object:
    if value.startswith("[") and value.endswith("]"):
        return [_scalar(v.strip()) for v in value[1:-1].split(",") if v.strip()]
    return _scalar(value)


def _scalar(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value
