"""What is on disk for one adapter, read without torch: config, weight index, files, model card."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, Protocol

from . import pickle_scan, safetensors_header
from .adapter_keys import AdapterKey, parse_key
from .gc_paused import gc_paused
from .model_card import read_front_matter

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin")
_LFS_PREFIX = b"version https://git-lfs"
_PY_LITERAL = re.compile(r"(None|True|False)\b")
MAX_CONFIG_SIZE = 64 << 20  # PEFT's configs are a few KB; a 4M-entry target_modules list is 40 MB
MAX_CONFIG_VALUES = 6_000_000  # json builds an object per value, ~70 bytes each: this bounds memory


@dataclass(frozen=True)
class LfsPointer:
    oid: str | None
    size: int | None


@dataclass(frozen=True)
class ConfigProblem:
    """Why adapter_config.json could not be turned into a dict."""

    kind: str  # missing, unreadable, too-large, empty, lfs-pointer, not-utf8, python-literal, invalid-json, not-object
    message: str
    line: int | None = None
    column: int | None = None


class Tensor(Protocol):
    """What the checks read of a tensor: a safetensors header entry or a pickled tensor's record."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str | None: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def numel(self) -> int: ...


@dataclass(frozen=True)
class PickledEntry:
    name: str
    dtype: str | None
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class WeightsFile:
    path: Path
    size: int
    format: str  # safetensors, pickle, lfs-pointer, empty, text, unreadable
    header: safetensors_header.Header | None = None
    pickle: pickle_scan.PickleScan | None = None
    lfs: LfsPointer | None = None
    problem: str | None = None  # why the file cannot be used as weights

    @cached_property
    def tensors(self) -> Mapping[str, Tensor] | None:
        if self.header is not None:
            return self.header.tensors  # TensorInfo has Tensor's fields; a copy would double a large index
        if self.pickle is not None and self.pickle.tensors is not None and self.pickle.passed:
            return {n: PickledEntry(n, t.dtype, t.shape) for n, t in self.pickle.tensors.items()}
        return None


@dataclass
class Artifact:
    root: Path
    config_path: Path
    kind: str  # adapter, checkpoint, config-only
    name: str | None = None  # the adapter name when found in a named subfolder
    config: dict | None = None
    config_problem: ConfigProblem | None = None
    files: dict[str, int] = field(default_factory=dict)
    weights: list[WeightsFile] = field(default_factory=list)
    model_card: dict | None = None

    @property
    def primary_weights(self) -> WeightsFile | None:
        """The file PEFT would load: safetensors first, then the pickle."""
        return self.weights[0] if self.weights else None

    @property
    def tensors(self) -> Mapping[str, Tensor] | None:
        primary = self.primary_weights
        return None if primary is None else primary.tensors

    @cached_property
    def keys(self) -> dict[str, AdapterKey]:
        """Every tensor name of the primary weights, parsed once for all the checks."""
        return {n: parse_key(n) for n in self.tensors or {}}


def read_lfs_pointer(head: bytes) -> LfsPointer:
    text = head.decode("utf-8", "replace")
    oid = re.search(r"oid sha256:([0-9a-f]{64})", text)
    size = re.search(r"^size (\d+)", text, re.M)
    return LfsPointer(oid.group(1) if oid else None, int(size.group(1)) if size else None)


def load_config(path: Path) -> tuple[dict | None, ConfigProblem | None]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        return None, ConfigProblem("missing", f"{path.name} does not exist")
    except OSError as exc:
        return None, ConfigProblem("unreadable", f"cannot read {path.name}: {exc.strerror or exc}")
    return parse_config_bytes(raw)


def parse_config_bytes(raw: bytes) -> tuple[dict | None, ConfigProblem | None]:
    """The JSON object in `raw`, or why there is none. Bounded: hostile input costs no more than ~0.5 GB."""
    if len(raw) > MAX_CONFIG_SIZE:
        return None, ConfigProblem("too-large", f"the file is over {MAX_CONFIG_SIZE >> 20} MiB; a PEFT config is a few KB")
    values = raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_CONFIG_VALUES:
        return None, ConfigProblem("too-large", f"the file holds about {values:,} JSON values; doctor reads at most "
                                                f"{MAX_CONFIG_VALUES:,}")
    if not raw.strip():
        return None, ConfigProblem("empty", "the file is empty" if not raw else "the file holds only whitespace")
    if raw.startswith(_LFS_PREFIX):
        lfs = read_lfs_pointer(raw[:512])
        size = f" of {lfs.size:,} bytes" if lfs.size is not None else ""
        return None, ConfigProblem("lfs-pointer", f"a Git LFS pointer stands where the JSON{size} should be")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, ConfigProblem("not-utf8", f"not UTF-8 text (byte {exc.start})")
    try:
        with gc_paused():
            obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, _json_problem(text, exc)
    except ValueError:  # int() refuses more than 4,300 digits, and so does PEFT's json.load
        return None, ConfigProblem("invalid-json", "an integer of more than 4,300 digits, which Python's json refuses")
    except RecursionError:
        return None, ConfigProblem("invalid-json", "JSON nested too deeply")
    if not isinstance(obj, dict):
        return None, ConfigProblem("not-object", f"the JSON is a {type(obj).__name__}, not an object")
    return obj, None


def _json_problem(text: str, exc: json.JSONDecodeError) -> ConfigProblem:
    # Python reprs of dicts (None/True/False) are a common way to write a config by hand.
    literal = _PY_LITERAL.match(text, exc.pos)
    if literal:
        json_word = {"None": "null", "True": "true", "False": "false"}[literal.group(1)]
        return ConfigProblem("python-literal", f"Python literal {literal.group(1)} where JSON needs {json_word}",
                             exc.lineno, exc.colno)
    return ConfigProblem("invalid-json", exc.msg, exc.lineno, exc.colno)


def read_weights(path: Path) -> WeightsFile:
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        return WeightsFile(path, 0, "unreadable", problem=f"cannot read: {exc.strerror or exc}")
    if size == 0:
        return WeightsFile(path, 0, "empty", problem="the file is empty")
    if head.startswith(_LFS_PREFIX):
        return WeightsFile(path, size, "lfs-pointer", lfs=read_lfs_pointer(head),
                           problem="a Git LFS pointer, not the weights (run `git lfs pull`)")
    text = _as_text(head, size)
    if text is not None and not _is_text_pickle(path):
        return WeightsFile(path, size, "text",
                           problem=f"a {size:,}-byte text file, not weights: {text!r}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, size)
    return WeightsFile(path, size, "pickle", pickle=pickle_scan.scan(path))


def _is_text_pickle(path: Path) -> bool:
    # A protocol-0 pickle is printable text; one that imports anything is no placeholder but code to run.
    return path.suffix != ".safetensors" and bool(pickle_scan.scan(path).globals)


def _as_text(head: bytes, size: int) -> str | None:
    """The first line of a small file that is plain text (a placeholder or an HTML error page)."""
    if size > 4096 or b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return None
    return text.strip().splitlines()[0][:80] if text.strip() else None


def _read_safetensors(path: Path, size: int) -> WeightsFile:
    try:
        header = safetensors_header.read_header(path)
    except safetensors_header.HeaderError as exc:
        return WeightsFile(path, size, "safetensors", problem=str(exc))
    except OSError as exc:
        return WeightsFile(path, size, "unreadable", problem=f"cannot read: {exc.strerror or exc}")
    return WeightsFile(path, size, "safetensors", header=header)


def read_artifact(root: Path, config_path: Path | None = None, name: str | None = None) -> Artifact:
    """Read everything doctor needs from an adapter folder (or a lone config file)."""
    config_path = config_path or root / CONFIG_NAME
    config_only = config_path.name != CONFIG_NAME
    files = {} if config_only else _list_files(root)
    kind = "config-only" if config_only else ("checkpoint" if _looks_like_checkpoint(root, files) else "adapter")
    art = Artifact(root=root, config_path=config_path, kind=kind, name=name, files=files)
    art.config, art.config_problem = load_config(config_path)
    if not config_only:
        art.weights = [read_weights(root / n) for n in WEIGHT_NAMES if n in files]
        if "README.md" in files:
            art.model_card = read_front_matter(root / "README.md")
    return art


def _list_files(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        entries = list(root.iterdir())
    except OSError:
        return out
    for entry in entries:
        try:
            if entry.is_file():
                out[entry.name] = entry.stat().st_size
        except OSError:
            continue
    return out


def _looks_like_checkpoint(root: Path, files: dict[str, int]) -> bool:
    return bool(re.fullmatch(r"checkpoint-\d+", root.name)) or any(n in files for n in CHECKPOINT_FILES)
