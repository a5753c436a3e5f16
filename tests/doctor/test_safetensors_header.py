import json
import struct

import numpy as np
import pytest
from adapter_doctor.safetensors_header import HeaderError, parse_header, read_header
from conftest import safetensors_bytes
from safetensors.numpy import save_file

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


def test_unsigned_view_is_as_wide_as_an_element():
    from adapter_doctor.safetensors_header import DTYPE_BITS, unsigned_view

    for dtype, bits in DTYPE_BITS.items():
        view = unsigned_view(dtype)
        if bits % 8:
            assert view is None, dtype  # F4, F6_*: no whole-byte element to view
        else:
            assert np.dtype(view).kind == "u" and np.dtype(view).itemsize * 8 == bits, dtype
            assert np.dtype(view).byteorder in "<|=", dtype  # the file's little-endian order
    assert unsigned_view("F17") is None
    # A bit pattern survives the view untouched, NaN payload included.
    nan = b"\x01\x00\xc0\x7f"
    assert np.frombuffer(nan, unsigned_view("F32")).tobytes() == nan


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


# --- hostile headers: every one is a HeaderError, never another exception -----------------------

def _header_code(text: bytes, tail: int = 0) -> str:
    with pytest.raises(HeaderError) as info:
        parse_header(text, 8 + len(text) + tail)
    assert "\n" not in str(info.value)
    return info.value.code


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_invalid_json(depth):
    assert _header_code(b'{"a":' + b"[" * depth + b"]" * depth + b"}") == "invalid-json"
    assert _header_code(b'{"a":' + b'{"b":' * depth + b"1" + b"}" * depth + b"}") in ("invalid-json", "bad-entry")


@pytest.mark.parametrize("where", ["shape", "data_offsets", "metadata"])
def test_integers_beyond_64_bits_of_any_length(where):
    big = b"1" * 4301
    entry = {"shape": b'{"a":{"dtype":"U8","shape":[%s],"data_offsets":[0,1]}}',
             "data_offsets": b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,%s]}}',
             "metadata": b'{"__metadata__":{"a":%s}}'}[where]
    assert _header_code(entry % big, 1) in ("bad-entry", "bad-metadata")
    assert _header_code(entry % b"18446744073709551616", 1) in ("bad-entry", "bad-metadata")


@pytest.mark.parametrize("number", [b"-0", b"1.0", b"1e0", b"NaN", b"Infinity", b"-1"])
def test_numbers_serde_would_not_read_as_unsigned(number):
    # Python's json reads -0 as the integer 0 and accepts NaN; the reference parser refuses both.
    assert _header_code(b'{"a":{"dtype":"U8","shape":[%s],"data_offsets":[0,0]}}' % number) == "bad-entry"


@pytest.mark.parametrize("dtype", [b"[]", b"{}", b"5", b"null", b'"f32"', b'["F32"]'])
def test_dtype_of_any_json_type(dtype):
    assert _header_code(b'{"a":{"dtype":%s,"shape":[1],"data_offsets":[0,4]}}' % dtype, 4) == "bad-dtype"


@pytest.mark.parametrize("text", [
    b'{"a\\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}',
    b'{"a\\udfff.b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}',
    b'{"__metadata__":{"k":"\\ud83d"}}',
    b'{"__metadata__":{"\\udc00":"v"}}',
])
def test_lone_surrogates_are_rejected_like_the_reference(text):
    assert _header_code(text) == "invalid-json"


def test_paired_surrogate_escapes_are_one_character():
    text = b'{"a\\ud83d\\ude00":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
    header = parse_header(text, 8 + len(text))
    assert list(header.tensors) == ["a\U0001F600"]


def test_entries_that_are_not_objects_and_objects_where_entries_belong():
    assert _header_code(b'{"a":[1,2]}') == "bad-entry"
    assert _header_code(b'{"a":{}}') == "bad-entry"
    assert _header_code(b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}', 4) == "bad-entry"
    assert _header_code(b'{"a":{"dtype":"U8","shape":[' + b"1," * 99 + b'1],"data_offsets":[0,1]}}', 1) == "bad-entry"


def test_a_header_of_a_million_empty_objects_is_refused_before_it_is_built():
    import tracemalloc

    text = b"{" + b",".join(b'"%d":{}' % i for i in range(1_000_000)) + b"}"
    tracemalloc.start()
    try:
        assert _header_code(text) in ("too-many-tensors", "too-many-values", "bad-entry")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"


# --- differential: never accept what the reference parser refuses ----------------------------------

from adapter_doctor.safetensors_header import DTYPE_BITS  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_names = st.text(st.characters(categories=["L", "N", "P"]) | st.sampled_from(["\ud800", "\udfff", "\x00"]), max_size=6)
_dims = st.lists(st.sampled_from([*range(6)] * 5 + [2**32, 2**63, 2**64]), max_size=3)
_number_forms = st.sampled_from(["{}"] * 30 + ["-0", "{}.0", "{}e0", "-{}", "0{}", "{} "])


@st.composite
def _headers(draw) -> bytes:
    """Headers near the valid ones: entries written by the rules, then nudged, in serde-visible text."""
    entries, offset = [], 0
    for name in draw(st.lists(_names, max_size=4)):
        dtype = draw(st.sampled_from([*DTYPE_BITS, "F17", "f32", "C128"]))
        shape = draw(_dims)
        size = DTYPE_BITS.get(dtype, 8)
        for d in shape:
            size *= d
        size = size // 8 + draw(st.sampled_from([0] * 8 + [1, -1]))
        begin = offset + draw(st.sampled_from([0] * 8 + [1, -1]))
        end = begin + size
        offset = max(offset, end)
        numbers = [draw(_number_forms).format(n) if n >= 0 else str(n) for n in (*shape, begin, end)]
        fields = [f'"dtype":{json.dumps(dtype)}', f'"shape":[{",".join(numbers[:-2])}]',
                  f'"data_offsets":[{numbers[-2]},{numbers[-1]}]']
        fields += draw(st.sampled_from([[]] * 8 + [['"extra":1'], ['"dtype":"U8"']]))
        entries.append(f"{json.dumps(name)}:{{{','.join(draw(st.permutations(fields)))}}}")
    if draw(st.booleans()):
        meta = draw(st.dictionaries(_names, _names | st.integers(0, 3), max_size=2))
        entries.append(f'"__metadata__":{json.dumps(meta)}')
    text = ("{" + ",".join(entries) + "}").encode() + draw(st.sampled_from([b""] * 6 + [b" ", b"\n", b"x"]))
    data = min(max(0, offset + draw(st.sampled_from([0] * 8 + [1, -1]))), 1 << 16)  # huge claims stay claims
    return struct.pack("<Q", len(text)) + text + bytes(data)


def _reference(path) -> tuple[list[str], dict | None] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return sorted(f.keys()), f.metadata()
    except Exception:  # noqa: BLE001 - any refusal counts
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_headers())
def test_never_accepts_what_safe_open_refuses(tmp_path, raw):
    path = tmp_path / "h.safetensors"
    path.write_bytes(raw)
    try:
        header = read_header(path)
    except HeaderError:
        return
    reference = _reference(path)
    assert reference is not None, f"the doctor accepts a header safetensors refuses: {raw[:300]!r}"
    assert reference == (sorted(header.tensors), header.metadata)
