"""A strict safetensors header parser that needs neither torch nor the safetensors package.

It enforces what the format promises (https://github.com/huggingface/safetensors#format) and never
accepts what the reference parser (serde_json into fixed Rust types) refuses: the 8-byte
little-endian length, a JSON object header without NaN, lone surrogates or numbers that are not
unsigned 64-bit integers, known dtypes, and a byte buffer that the tensors cover exactly, with no
hole, no overlap, nothing missing and nothing trailing.

Headers come from strangers, so parsing costs bounded memory: the JSON values are counted before
`json` builds any of them, and each tensor entry is packed into a tuple as soon as it is parsed.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

from .gc_paused import gc_paused

MAX_HEADER_SIZE = 100_000_000  # the reference implementation's cap
MAX_TENSORS = 1 << 19  # several times the largest real adapter (per-expert LoRA of a 1T-parameter MoE)
MAX_DIMS = 64  # numpy's and torch's limit
_MAX_VALUES = 12 * MAX_TENSORS  # a tensor entry is about ten JSON values
_U64_LIMIT = 1 << 64
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_ENTRY_ORDER = {"dtype": 0, "shape": 1, "data_offsets": 2}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")

# Bits per element. Sub-byte types are legal only when a tensor's total bit count is whole bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_DTYPE_NAMES = {name: name for name in DTYPE_BITS}  # one shared string per dtype, whatever the header repeats


def element_bytes(dtype: str) -> int | None:
    """Bytes per element of a whole-byte dtype; None for a sub-byte or unknown one."""
    bits = DTYPE_BITS.get(dtype)
    return bits // 8 if bits is not None and bits % 8 == 0 else None


def unsigned_view(dtype: str) -> str | None:
    """The little-endian unsigned numpy dtype as wide as one element of `dtype` (e.g. "<u2" for BF16), to move
    or compare elements as bit patterns, never converted; None for a sub-byte or unknown dtype."""
    width = element_bytes(dtype)
    return None if width is None else f"<u{width}"


COMPONENT = {"C64": "F32"}  # a complex number is two floats, each swapped on its own (as torch's byteswap does)


def little_endian(raw: bytes | memoryview, dtype: str) -> bytes | memoryview:
    """The elements of a big-endian archive's storage bytes (whole elements of `dtype`) in little-endian order,
    as torch.load byte-swaps them."""
    unit = COMPONENT.get(dtype, dtype)
    if (element_bytes(unit) or 1) == 1:
        return raw
    import numpy as np

    return np.frombuffer(raw, dtype=unsigned_view(unit)).byteswap().data


class HeaderError(Exception):
    """The file is not a valid safetensors file. `code` is stable; the message names the problem."""

    def __init__(self, code: str, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.tensor = tensor


class TensorInfo(NamedTuple):  # a tuple: hundreds of thousands are built per header
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    header_size: int
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str] | None
    file_size: int


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and validate `path`. Raises HeaderError on any violation, OSError if unreadable."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise HeaderError("header-too-small", f"file is {size} bytes; a safetensors file starts with an 8-byte length")
        (n,) = struct.unpack("<Q", head)
        _check_length(n, size, head)
        return parse_header(fh.read(n), size)


def _check_length(n: int, size: int, head: bytes) -> None:
    if n > MAX_HEADER_SIZE:
        if head.startswith(b"version "):
            raise HeaderError("lfs-pointer", "this is a Git LFS pointer, not the weights")
        raise HeaderError("header-too-large", f"header length field says {n:,} bytes (limit {MAX_HEADER_SIZE:,})")
    if 8 + n > size:
        raise HeaderError("truncated", f"header length field says {n:,} bytes but the file has only {size - 8:,} after it")


def parse_header(raw: bytes, file_size: int) -> Header:
    """Validate header bytes `raw` (without the 8-byte length) for a file of `file_size` bytes."""
    with gc_paused():
        return _parse_header(raw, file_size)


def _parse_header(raw: bytes, file_size: int) -> Header:
    data_start = 8 + len(raw)
    metadata, tensors, seen = None, [], set()
    for name, entry in _decode_json(raw):
        if name in seen:
            raise HeaderError("duplicate-key", f"header names tensor {_shown(name)} twice", name)
        seen.add(name)
        if name == "__metadata__":
            metadata = _metadata(entry)
        else:
            tensors.append(_tensor(name, entry, data_start))
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_coverage(tensors, data_start, file_size)
    return Header(len(raw), {t.name: t for t in tensors}, metadata, file_size)


class _Object:
    """A JSON object that is not a tensor entry (the root, `__metadata__`, or a misplaced one)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


def _object(pairs: list[tuple[str, object]]) -> object:
    # A tensor entry becomes a tuple at once (json never makes tuples, so nothing else looks like one).
    if len(pairs) == 3:
        (k0, v0), (k1, v1), (k2, v2) = pairs
        entry: tuple[object, ...]
        if k0 == "dtype" and k1 == "shape" and k2 == "data_offsets":  # the order safetensors writes
            entry = (v0, v1, v2)
        elif {k0, k1, k2} == _ENTRY_KEYS:
            entry = tuple(v for _, v in sorted(pairs, key=lambda kv: _ENTRY_ORDER[kv[0]]))
        else:
            return _Object(pairs)
        if type(entry[1]) is list and type(entry[2]) is list:
            return entry
    return _Object(pairs)


def _uint(text: str) -> int:
    # serde reads -0 as a float and has no integers beyond 64 bits, which Python's json parses (up to
    # 4,300 digits, then raises). Either becomes a value that no place in the format accepts.
    if text[0] == "-":
        return -1
    return _U64_LIMIT if len(text) > 20 else int(text)


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_uint)
_FAST_DECODER = json.JSONDecoder(object_pairs_hook=_object)  # for headers without '-'


def _decode_json(raw: bytes) -> list[tuple[str, object]]:
    _check_size(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError("invalid-utf8", f"header is not UTF-8 (byte {exc.start})") from None
    if not text.startswith("{"):
        raise HeaderError("invalid-json", "header does not start with '{'")
    decoder = _DECODER if b"-" in raw else _FAST_DECODER  # parse_int costs a call per integer
    try:
        root = decoder.decode(text)  # trailing spaces (padding) are JSON whitespace
    except json.JSONDecodeError as exc:
        raise HeaderError("invalid-json", f"header JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError:  # int() refuses more than 4,300 digits; such a number fits no place in the format
        raise HeaderError("bad-entry", "header holds an integer of more than 4,300 digits") from None
    except RecursionError:
        raise HeaderError("invalid-json", "header JSON is nested too deeply") from None
    if not isinstance(root, _Object):
        raise HeaderError("bad-entry", "header is a single tensor entry (dtype, shape, data_offsets), not a map of tensors")
    if _SURROGATE_ESCAPE.search(raw):
        _reject_lone_surrogates(root.pairs)
    return root.pairs


def _check_size(raw: bytes) -> None:
    # json builds every value before a hook sees it: a header of a million `{}` or `[]` would cost
    # gigabytes. Braces, brackets and commas bound the count of values from above.
    objects = raw.count(b"{")
    if objects > MAX_TENSORS + 2:
        raise HeaderError("too-many-tensors", f"header holds about {objects:,} JSON objects; doctor reads at most "
                                              f"{MAX_TENSORS:,} tensors, more than any adapter has")
    values = objects + raw.count(b"[") + raw.count(b",")
    if values > _MAX_VALUES:
        raise HeaderError("too-many-values", f"header holds about {values:,} JSON values; {MAX_TENSORS:,} tensors "
                                             f"need at most {_MAX_VALUES:,}")


def _reject_lone_surrogates(pairs: list[tuple[str, object]]) -> None:
    # serde_json refuses an escaped lone surrogate (`\\ud800`) anywhere; Python's json decodes it.
    meta = [p for _, v in pairs if isinstance(v, _Object) for p in v.pairs]
    strings = [s for k, v in (*pairs, *meta) for s in (k, v) if isinstance(s, str) and not s.isascii()]
    bad = next((s for s in strings if _SURROGATE.search(s)), None)
    if bad is not None:
        raise HeaderError("invalid-json", f"header holds a lone surrogate in {_shown(bad)}; the reference parser refuses it")


def _metadata(meta: object) -> dict[str, str] | None:
    if meta is None:
        return None
    if not isinstance(meta, _Object) or not all(isinstance(v, str) for _, v in meta.pairs):
        raise HeaderError("bad-metadata", "__metadata__ must map strings to strings")
    out = {k: str(v) for k, v in meta.pairs}
    if len(out) != len(meta.pairs):
        raise HeaderError("bad-metadata", "__metadata__ names a key twice")
    return out


def _uints(values: list) -> bool:
    """Every item is a JSON integer in [0, 2**64) (booleans are ints to Python, not to serde)."""
    for v in values:
        if type(v) is not int or v < 0 or v >= _U64_LIMIT:
            return False
    return True


def _shown(name: str) -> str:
    """A tensor name for a message: a header may hold a name of a million characters."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


def _describe(value: object) -> str:
    if isinstance(value, str):
        return repr(value[:40])
    return {list: "an array", _Object: "an object", type(None): "null", bool: "a boolean"}.get(type(value), "a number")


def _tensor(name: str, entry: object, data_start: int) -> TensorInfo:
    if type(entry) is not tuple:
        raise HeaderError("bad-entry", f"tensor {_shown(name)} needs exactly dtype, shape and data_offsets", name)
    dtype, shape, offsets = entry
    bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
    if bits is None:
        raise HeaderError("bad-dtype", f"tensor {_shown(name)} has unknown dtype {_describe(dtype)}", name)
    if len(shape) > MAX_DIMS or not _uints(shape):
        raise HeaderError("bad-entry", f"tensor {_shown(name)} shape must be at most {MAX_DIMS} non-negative integers", name)
    if len(offsets) != 2 or not _uints(offsets):
        raise HeaderError("bad-entry", f"tensor {_shown(name)} data_offsets must be two non-negative integers", name)
    begin, end = offsets
    if end < begin:
        raise HeaderError("bad-offsets", f"tensor {_shown(name)} ends before it begins ({begin}..{end})", name)
    if 0 in shape:  # checked arithmetic, as a u64 reader does it: overflow before a 0 dim still fails
        if bits * math.prod(shape[:shape.index(0)]) >= _U64_LIMIT:
            raise HeaderError("overflow", f"tensor {_shown(name)} shape {shape} overflows 64-bit size arithmetic", name)
        bits = 0
    else:
        bits *= math.prod(shape)
        if bits >= _U64_LIMIT:
            raise HeaderError("overflow", f"tensor {_shown(name)} shape {shape} overflows 64-bit size arithmetic", name)
    if bits % 8:
        raise HeaderError("misaligned", f"tensor {_shown(name)} of {dtype} {shape} is not a whole number of bytes", name)
    if bits // 8 != end - begin:
        raise HeaderError(
            "span-mismatch",
            f"tensor {_shown(name)} is {dtype} {shape} = {bits // 8:,} bytes but its offsets span {end - begin:,}",
            name,
        )
    return TensorInfo(name, _DTYPE_NAMES[dtype], tuple(shape), data_start + begin, data_start + end)


def _check_coverage(tensors: list[TensorInfo], data_start: int, file_size: int) -> None:
    cursor = data_start
    for t in tensors:
        if t.begin < cursor:
            raise HeaderError("overlap", f"tensor {_shown(t.name)} overlaps the tensor before it", t.name)
        if t.begin > cursor:
            raise HeaderError("gap", f"{t.begin - cursor:,} unindexed bytes before tensor {_shown(t.name)}", t.name)
        cursor = t.end
    if cursor > file_size:
        raise HeaderError("truncated", f"file is {cursor - file_size:,} bytes shorter than its header says (truncated download?)")
    if cursor < file_size:
        raise HeaderError("trailing", f"{file_size - cursor:,} bytes after the last tensor")

