"""A strict safetensors header parser that needs neither torch nor the safetensors package.

It enforces what the format promises (https://github.com/huggingface/safetensors#format): the
8-byte little-endian length, a JSON object header, known dtypes, and a byte buffer that the
tensors cover exactly, with no hole, no overlap, nothing missing and nothing trailing.
"""
from __future__ import annotations

import math
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_SIZE = 100_000_000  # the reference implementation's cap
_U64_LIMIT = 1 << 64

# Bits per element. Sub-byte types are legal only when a tensor's total bit count is whole bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


class HeaderError(Exception):
    """The file is not a valid safetensors file. `code` is stable; the message names the problem."""

    def __init__(self, code: str, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.tensor = tensor


@dataclass(frozen=True)
class TensorInfo:
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
    data_start = 8 + len(raw)
    obj = _decode_json(raw)
    metadata = _metadata(obj.pop("__metadata__", None))
    tensors = [_tensor(name, entry, data_start) for name, entry in obj.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_coverage(tensors, data_start, file_size)
    return Header(len(raw), {t.name: t for t in tensors}, metadata, file_size)


def _decode_json(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError("invalid-utf8", f"header is not UTF-8 (byte {exc.start})") from None
    if not text.startswith("{"):
        raise HeaderError("invalid-json", "header does not start with '{'")
    try:
        return json.loads(text.rstrip(" "), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise HeaderError("invalid-json", f"header JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except _Duplicate as dup:
        raise HeaderError("duplicate-key", f"header names tensor {dup.key!r} twice", dup.key) from None


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _metadata(meta: object) -> dict[str, str] | None:
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError("bad-metadata", "__metadata__ must map strings to strings")
    return meta


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _U64_LIMIT


def _tensor(name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError("bad-entry", f"tensor {name!r} needs exactly dtype, shape and data_offsets", name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise HeaderError("bad-dtype", f"tensor {name!r} has unknown dtype {dtype!r}", name)
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise HeaderError("bad-entry", f"tensor {name!r} shape must be a list of non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise HeaderError("bad-entry", f"tensor {name!r} data_offsets must be two non-negative integers", name)
    begin, end = offsets
    if end < begin:
        raise HeaderError("bad-offsets", f"tensor {name!r} ends before it begins ({begin}..{end})", name)
    bits = DTYPE_BITS[dtype]
    for d in shape:  # checked arithmetic, as a u64 reader must do
        bits *= d
        if bits >= _U64_LIMIT:
            raise HeaderError("overflow", f"tensor {name!r} shape {shape} overflows 64-bit size arithmetic", name)
    if bits % 8:
        raise HeaderError("misaligned", f"tensor {name!r} of {dtype} {shape} is not a whole number of bytes", name)
    if bits // 8 != end - begin:
        raise HeaderError(
            "span-mismatch",
            f"tensor {name!r} is {dtype} {shape} = {bits // 8:,} bytes but its offsets span {end - begin:,}",
            name,
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_coverage(tensors: list[TensorInfo], data_start: int, file_size: int) -> None:
    cursor = data_start
    for t in tensors:
        if t.begin < cursor:
            raise HeaderError("overlap", f"tensor {t.name!r} overlaps the tensor before it", t.name)
        if t.begin > cursor:
            raise HeaderError("gap", f"{t.begin - cursor:,} unindexed bytes before tensor {t.name!r}", t.name)
        cursor = t.end
    if cursor > file_size:
        raise HeaderError("truncated", f"file is {cursor - file_size:,} bytes shorter than its header says (truncated download?)")
    if cursor < file_size:
        raise HeaderError("trailing", f"{file_size - cursor:,} bytes after the last tensor")

