"""Classify raw little-endian float bytes as "all zero" and "has NaN or Inf", for any float width.

Both tests read only bit patterns. With the sign bit masked off, a value is zero when every bit is 0,
and NaN or Inf when its exponent bits are all 1. numpy does this with one mask and one max per
chunk; for small tensors, where importing numpy would cost more than the scan, the same tests run
on bytes objects with C-speed `bytes` methods.
"""
from __future__ import annotations

from functools import lru_cache

from .safetensors_header import element_bytes, unsigned_view

_MASKS = {  # dtype -> (magnitude mask, exponent mask)
    "BF16": (0x7FFF, 0x7F80),
    "F16": (0x7FFF, 0x7C00),
    "F32": (0x7FFFFFFF, 0x7F800000),
    "F64": (0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
# dtype -> (element width, numpy view of its bits, magnitude mask, exponent mask)
FLOATS = {d: (element_bytes(d) or 0, unsigned_view(d) or "", *masks) for d, masks in _MASKS.items()}


def classify_numpy(buf: memoryview, dtype: str | None) -> tuple[bool, bool]:
    """(all zero, has NaN/Inf) for one chunk: the largest magnitude answers both."""
    import numpy as np

    spec = FLOATS.get(dtype or "")
    if spec is None:
        return not np.frombuffer(buf, dtype=np.uint8).any(), False
    _, view, magnitude, exponent = spec
    arr = np.frombuffer(buf, dtype=view)
    peak = int(np.bitwise_and(arr, arr.dtype.type(magnitude)).max())
    return peak == 0, peak >= exponent


def classify_many(buf: memoryview, dtype: str | None, starts: list[int]) -> tuple[list[bool], list[bool]]:
    """`classify_numpy` for many consecutive non-empty tensors of one dtype in one buffer, in one pass;
    `starts`: each tensor's byte offset in `buf`, increasing."""
    import numpy as np

    spec = FLOATS.get(dtype or "")
    if spec is None:
        peaks = np.maximum.reduceat(np.frombuffer(buf, dtype=np.uint8), np.asarray(starts, dtype=np.intp))
        return (peaks == 0).tolist(), [False] * len(starts)
    width, view, magnitude, exponent = spec
    arr = np.frombuffer(buf, dtype=view)
    masked = np.bitwise_and(arr, arr.dtype.type(magnitude))
    peaks = np.maximum.reduceat(masked, np.asarray(starts, dtype=np.intp) // width)
    return (peaks == 0).tolist(), (peaks >= exponent).tolist()


@lru_cache(maxsize=16)
def _has_bits(mask: int) -> bytes:
    """A translate table: 1 for bytes with every bit of `mask` set, else 0."""
    return bytes(1 if b & mask == mask else 0 for b in range(256))


_CLEAR_SIGN = bytes(b & 0x7F for b in range(256))


def classify_bytes(buf: memoryview, dtype: str | None) -> tuple[bool, bool]:
    """The same answers as `classify_numpy`, from the top one or two bytes of each element."""
    data = bytes(buf)
    spec = FLOATS.get(dtype or "")
    if spec is None:
        return data.count(0) == len(data), False
    width, _, _, exponent = spec
    top = exponent >> (8 * (width - 1))  # exponent bits in the most significant byte
    nxt = (exponent >> (8 * (width - 2))) & 0xFF  # ... and in the byte below it
    unsigned = bytearray(data)
    unsigned[width - 1::width] = data[width - 1::width].translate(_CLEAR_SIGN)
    all_zero = unsigned.count(0) == len(unsigned)
    hi = data[width - 1::width].translate(_has_bits(top))
    lo = data[width - 2::width].translate(_has_bits(nxt))
    # An element is NaN/Inf when both of its bytes carry all their exponent bits; AND-ing the two
    # 0/1 byte strings as big integers finds such a position without a Python loop.
    nonfinite = int.from_bytes(hi, "little") & int.from_bytes(lo, "little") != 0
    return all_zero, nonfinite
