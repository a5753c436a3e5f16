"""The environment an adapter will be loaded in: installed versions, or the versions the user targets.

Versions are read from `*.dist-info` folder names on `sys.path`, which is what importlib.metadata
does too, without the ~50 ms it costs to import. Nothing here imports torch, transformers or peft.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache

_DIST_INFO = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+?)\.(dist-info|egg-info)$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@lru_cache(maxsize=1)
def _installed_index() -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            m = _DIST_INFO.match(name)
            if m:
                found.setdefault(_normalise(m.group("name")), m.group("version"))
    return found


def installed_version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None."""
    return _installed_index().get(_normalise(dist))


@dataclass(frozen=True)
class Env:
    """Versions to judge an adapter against. `*_source` says where each came from."""

    peft: str | None
    peft_source: str  # "flag", "installed" or "none"
    transformers: str | None
    transformers_source: str

    @classmethod
    def detect(cls, target_peft: str | None = None, target_transformers: str | None = None) -> "Env":
        peft, peft_src = _pick(target_peft, "peft")
        tf, tf_src = _pick(target_transformers, "transformers")
        return cls(peft, peft_src, tf, tf_src)


def _pick(flag: str | None, dist: str) -> tuple[str | None, str]:
    if flag:
        return flag, "flag"
    version = installed_version(dist)
    return (version, "installed") if version else (None, "none")
