"""Read and write safetensors files for fixers, without torch.

Renames rewrite only the header and stream the data section through unchanged, so the tensors stay
bit-exact however large the file is.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapter_doctor.safetensors_header import DTYPE_BITS, read_header

COPY_CHUNK = 1 << 22


@dataclass
class RawTensor:
    dtype: str  # safetensors dtype name: BF16, F32, ...
    shape: tuple[int, ...]
    data: bytes  # C order, little-endian

    def __post_init__(self) -> None:
        self.shape = tuple(self.shape)
        expected = DTYPE_BITS[self.dtype] * math.prod(self.shape) // 8
        if len(self.data) != expected:
            raise ValueError(f"{self.dtype} {list(self.shape)} needs {expected} bytes, got {len(self.data)}")


def read_tensors(path: Path) -> tuple[dict[str, RawTensor], dict[str, str] | None]:
    """Every tensor of a (validated) safetensors file, in file order, and its metadata."""
    header = read_header(path)
    out: dict[str, RawTensor] = {}
    with open(path, "rb") as fh:
        for name, t in header.tensors.items():
            fh.seek(t.begin)
            out[name] = RawTensor(t.dtype, t.shape, fh.read(t.nbytes))
    return out, header.metadata


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_tensors(path: Path, tensors: dict[str, RawTensor], metadata: dict[str, str] | None) -> None:
    """Write `tensors` in the given order and fsync the file."""
    entries = [(n, t.dtype, t.shape, len(t.data)) for n, t in tensors.items()]
    with open(path, "wb") as fh:
        fh.write(_header_bytes(entries, metadata))
        for t in tensors.values():
            fh.write(t.data)
        _sync(fh)


def write_renamed(src: Path, dst: Path, renames: dict[str, str], metadata: dict[str, str] | None) -> None:
    """`src` with tensors renamed: a new header, then the data section copied byte for byte."""
    header = read_header(src)
    entries = [(renames.get(n, n), t.dtype, t.shape, t.nbytes) for n, t in header.tensors.items()]
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("the renames map two tensors to one name")
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(_header_bytes(entries, metadata))
        fin.seek(8 + header.header_size)  # the validated header guarantees the rest is exactly the data
        while chunk := fin.read(COPY_CHUNK):
            fout.write(chunk)
        _sync(fout)


def _sync(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())
