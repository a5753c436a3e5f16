"""Turn the paths a user typed into the adapters to check."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .artifact import CONFIG_NAME, WEIGHT_NAMES


class TargetError(Exception):
    """A path that is not something doctor can check (exit code 2)."""


@dataclass(frozen=True)
class Target:
    root: Path  # the adapter folder
    config_path: Path
    name: str | None  # adapter name, for PEFT's `<dir>/<name>/` layout


def _has_adapter(folder: Path) -> bool:
    return any((folder / n).is_file() for n in (CONFIG_NAME, *WEIGHT_NAMES))


def discover(path: Path) -> list[Target]:
    """Adapters at `path`: a folder, a config file, a checkpoint, or a folder of named adapters."""
    if not path.exists():
        raise TargetError(f"{path}: no such file or folder")
    if path.is_file():
        return [_from_file(path)]
    if not path.is_dir():
        raise TargetError(f"{path}: not a regular file or folder")
    found = [Target(path, path / CONFIG_NAME, None)] if _has_adapter(path) else []
    try:
        children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise TargetError(f"{path}: cannot list the folder ({exc.strerror or exc})") from None
    # PEFT saves a non-default adapter in <dir>/<name>/; a Trainer output dir holds checkpoint-N/.
    found += [Target(c, c / CONFIG_NAME, c.name) for c in children if _has_adapter(c)]
    if not found:
        raise TargetError(f"{path}: no {CONFIG_NAME} or adapter weights here or in its immediate subfolders")
    return found


def _from_file(path: Path) -> Target:
    if path.name in WEIGHT_NAMES:
        return Target(path.parent, path.parent / CONFIG_NAME, None)
    if path.suffix == ".json":
        # A config under another name (a copy, a download) is checked on its own, without weights.
        return Target(path.parent, path, None)
    raise TargetError(f"{path}: expected an adapter folder, {CONFIG_NAME} or an adapter weights file")
