"""Shared test helpers: paths to committed data and a tiny safetensors writer for byte-level cases."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
FIXTURES = ROOT / "fixtures"


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None,
                      header_override: dict | None = None, pad: int = 0) -> bytes:
    """Build a safetensors file from name -> (dtype, shape, raw bytes), in name order."""
    header: dict = {}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    if header_override:
        header.update(header_override)
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


@pytest.fixture
def write_safetensors(tmp_path: Path):
    def write(name: str = "adapter_model.safetensors", **kwargs) -> Path:
        path = tmp_path / name
        path.write_bytes(safetensors_bytes(**kwargs))
        return path

    return write
