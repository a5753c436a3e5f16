import numpy as np
import pytest
from adapter_doctor.float_bits import FLOATS, classify_bytes, classify_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

SPECIAL = {
    "BF16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F7F, 0x0001, 0x3F80],
    "F16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0x0001, 0x3C00],
    "F32": [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 1, 0x3F800000],
    "F64": [0, 1 << 63, 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000, 0x7FEFFFFFFFFFFFFF, 1],
}


def reference(raw: bytes, dtype: str) -> tuple[bool, bool]:
    """Decode as floats and ask numpy; bf16 widens exactly to f32."""
    if dtype == "BF16":
        values = (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4")
    else:
        values = np.frombuffer(raw, {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype])
    return bool((values == 0).all()), bool((~np.isfinite(values)).any())


@settings(max_examples=400, deadline=None)
@given(dtype=st.sampled_from(sorted(FLOATS)), data=st.data())
def test_both_classifiers_agree_with_decoded_floats(dtype, data):
    width, view = FLOATS[dtype][0], FLOATS[dtype][1]
    words = data.draw(st.lists(st.one_of(st.sampled_from(SPECIAL[dtype]), st.integers(0, 2 ** (8 * width) - 1)),
                               min_size=1, max_size=64))
    raw = np.array(words, dtype=view).tobytes()
    expected = reference(raw, dtype)
    assert classify_bytes(memoryview(raw), dtype) == expected
    assert classify_numpy(memoryview(raw), dtype) == expected


@pytest.mark.parametrize("dtype", sorted(FLOATS))
def test_signed_zeros_are_zero_and_each_special_is_found(dtype):
    width, view = FLOATS[dtype][0], FLOATS[dtype][1]
    zeros = np.array([0, 1 << (8 * width - 1)] * 5, dtype=view).tobytes()
    assert classify_bytes(memoryview(zeros), dtype) == (True, False)
    for special in SPECIAL[dtype][2:5]:  # +inf, -inf, nan
        raw = zeros + np.array([special], dtype=view).tobytes()
        assert classify_bytes(memoryview(raw), dtype) == (False, True)


def test_integer_tensors_are_only_checked_for_zeros():
    assert classify_bytes(memoryview(bytes(8)), "I64") == (True, False)
    assert classify_bytes(memoryview(b"\xff" * 8), "I64") == (False, False)
    assert classify_numpy(memoryview(b"\xff" * 8), "I64") == (False, False)
