import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapter_doctor.safetensors_header import HeaderError, parse_header, read_header
from conftest import safetensors_bytes

F32x4 = ("F32", [2, 2], np.arange(4, dtype=np.float32).tobytes())


def test_reads_a_file_written_by_the_reference_library(tmp_path):
    path = tmp_path / "a.safetensors"
    arrays = {"b": np.ones((3, 5), dtype=np.float16), "a": np.zeros((7,), dtype=np.int64), "e": np.zeros((0, 4), np.float32)}
    save_file(arrays, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert {n: (t.dtype, t.shape) for n, t in header.tensors.items()} == {
        "a": ("I64", (7,)), "b": ("F16", (3, 5)), "e": ("F32", (0, 4))}
    a = header.tensors["a"]
    assert path.read_bytes()[a.begin:a.end] == arrays["a"].tobytes()


def _code(raw: bytes) -> str:
    with pytest.raises(HeaderError) as info:
        (n,) = struct.unpack("<Q", raw[:8])
        parse_header(raw[8:8 + n], len(raw))
    return info.value.code


@pytest.mark.parametrize("override, code", [
    ({"x": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, "bad-dtype"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, "span-mismatch"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "bad-entry"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "bad-offsets"),
    ({"x": {"dtype": "F32", "shape": [1]}}, "bad-entry"),
    ({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, "overflow"),
    ({"x": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, "misaligned"),
    ({"__metadata__": {"format": 1}}, "bad-metadata"),
])
def test_rejects_malformed_entries(override, code):
    raw = safetensors_bytes({"x": ("F32", [1], b"\0" * 4)}, header_override=override)
    assert _code(raw) == code


def test_rejects_overlap_gap_truncation_and_trailing_bytes():
    two = {"a": ("F32", [1], b"\0" * 4), "b": ("F32", [1], b"\0" * 4)}
    overlap = {"b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}
    gap = {"b": {"dtype": "F32", "shape": [1], "data_offsets": [6, 10]}}
    assert _code(safetensors_bytes(two, header_override=overlap) + b"\0\0") == "overlap"
    assert _code(safetensors_bytes(two, header_override=gap)) == "gap"
    good = safetensors_bytes(two)
    assert _code(good[:-1]) == "truncated"
    assert _code(good + b"x") == "trailing"


def test_rejects_duplicate_names_and_bad_json():
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    with pytest.raises(HeaderError) as info:
        parse_header(raw, 8 + len(raw) + 4)
    assert info.value.code == "duplicate-key"
    with pytest.raises(HeaderError) as info:
        parse_header(b'{"a": ', 100)
    assert info.value.code == "invalid-json" and "line 1" in str(info.value)
    with pytest.raises(HeaderError) as info:
        parse_header(b"[1, 2]", 100)
    assert info.value.code == "invalid-json"


def test_accepts_space_padding_and_empty_files(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(safetensors_bytes({"x": F32x4}, pad=5))
    assert read_header(path).tensors["x"].shape == (2, 2)
    path.write_bytes(safetensors_bytes({}))
    assert read_header(path).tensors == {}


def test_recognises_an_lfs_pointer_and_oversized_lengths(tmp_path):
    path = tmp_path / "lfs.safetensors"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 12\n")
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert info.value.code == "lfs-pointer"
    path.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert info.value.code == "header-too-large"
    path.write_bytes(b"abc")
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert info.value.code == "header-too-small"
