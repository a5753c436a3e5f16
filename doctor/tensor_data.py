"""Stream the raw bytes of saved tensors, from safetensors or torch pickles, without torch.

Memory stays bounded whatever a file claims: data is read in chunks of at most CHUNK bytes, a
strided view is read as the span of storage it covers (gathered element by element only when that
span is small), and decompression never goes past the sizes the archive declares, nor past a budget
proportional to the file's own size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from io import BufferedIOBase, RawIOBase
from typing import TYPE_CHECKING, Callable, Iterator

from .artifact import WeightsFile
from .float_bits import classify_bytes, classify_many, classify_numpy
from .pickle_scan import PickledTensor, zip_errors
from .safetensors_header import COMPONENT, element_bytes, little_endian

if TYPE_CHECKING:
    import hashlib
    import zipfile

CHUNK = 1 << 24  # bytes per step; large enough to amortise numpy call overhead
SMALL = 1 << 20  # below this much data, importing numpy costs more than the scan itself
GATHER_LIMIT = 1 << 26  # a non-contiguous view is gathered exactly when the storage it spans fits this
_MIN_BUDGET = 1 << 28
_BATCHED = 1 << 16  # tensors smaller than this are classified many at a time

Chunks = Iterator[tuple[str, str | None, memoryview]]
Reader = Callable[[int, int], Iterator[memoryview]]  # storage byte range -> its bytes, chunk by chunk


class TensorDataError(Exception):
    """The tensor data cannot be read as the index describes it. `kind`: "damaged" or "expands"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class TensorStats:
    all_zero: bool = True
    nonfinite: bool = False  # NaN or Inf somewhere


class _Budget:
    """Bytes that may be read or inflated in one pass: views and deflate can multiply a small file."""

    def __init__(self, file_size: int) -> None:
        self.total = self.left = max(_MIN_BUDGET, 16 * file_size)

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise TensorDataError("expands", f"its tensors expand to more than {self.total:,} bytes of data "
                                             "(a decompression bomb, or views that repeat one storage)")


def _safetensors_regions(wf: WeightsFile) -> Chunks:
    # Tensors are contiguous and in file order, so one forward pass of large reads serves them all.
    assert wf.header is not None
    with open(wf.path, "rb", buffering=0) as fh:
        block, block_start = b"", 0
        for t in wf.header.tensors.values():
            pos = t.begin
            while pos < t.end:
                if not block_start <= pos < block_start + len(block):
                    fh.seek(pos)
                    block, block_start = fh.read(CHUNK), pos
                    if not block:
                        raise TensorDataError("damaged", f"the file ends inside tensor {t.name!r}")
                take = min(t.end, block_start + len(block)) - pos
                yield t.name, t.dtype, memoryview(block)[pos - block_start:pos - block_start + take]
                pos += take


def _direct_reader(fh: RawIOBase | BufferedIOBase, base: int, budget: _Budget) -> Reader:
    def read(start: int, stop: int) -> Iterator[memoryview]:
        budget.spend(stop - start)
        fh.seek(base + start)
        while start < stop:
            data = fh.read(min(CHUNK, stop - start))
            if not data:
                raise TensorDataError("damaged", "the file ends inside a storage (truncated)")
            start += len(data)
            yield memoryview(data)
    return read


def _member_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> Reader:
    def read(start: int, stop: int) -> Iterator[memoryview]:
        pos = 0
        with zf.open(info) as member:  # inflates at most info.file_size bytes, then checks the CRC
            while pos < stop:
                want = min(CHUNK, stop - pos) if pos >= start else min(CHUNK, start - pos)
                budget.spend(want)
                data = member.read(want)
                if not data:
                    raise TensorDataError("damaged", f"{info.filename} ends early")
                if pos + len(data) > start:
                    yield memoryview(data)[max(0, start - pos):]
                pos += len(data)
    return read


def _zip_readers(wf: WeightsFile, zf: zipfile.ZipFile, fh: RawIOBase | BufferedIOBase, budget: _Budget) -> Callable[[str], Reader]:
    import zipfile

    assert wf.pickle is not None  # only a scanned zip pickle is read this way
    prefix = wf.pickle.archive_prefix

    def reader(key: str) -> Reader:
        info = zf.getinfo(f"{prefix}data/{key}")
        if info.compress_type != zipfile.ZIP_STORED:
            return _member_reader(zf, info, budget)
        name_len, extra_len = _local_header(fh, info.header_offset)
        return _direct_reader(fh, info.header_offset + 30 + name_len + extra_len, budget)
    return reader


def _local_header(fh: RawIOBase | BufferedIOBase, offset: int) -> tuple[int, int]:
    fh.seek(offset)
    head = fh.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise TensorDataError("damaged", f"no zip member header at byte {offset:,}")
    return int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30], "little")


def _collapse(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Drop dims that do not move through storage (size 1, or stride 0 as `expand` makes)."""
    kept = [(d, s) for d, s in zip(shape, stride) if d != 1 and s != 0]
    return [d for d, _ in kept], [s for _, s in kept]


def _view_chunks(name: str, t: PickledTensor, read: Reader, byteorder: str = "little") -> Chunks:
    width = element_bytes(t.dtype or "") or 1
    if t.numel == 0:
        return
    shape, stride = _collapse(t.shape, t.stride)
    lo, count = t.offset, math.prod(shape)
    hi = lo + sum((d - 1) * s for d, s in zip(shape, stride)) + 1  # one past the last element it reads
    if hi - lo == count and all(s == math.prod(shape[i + 1:]) for i, s in enumerate(stride)):
        chunks = read(lo * width, hi * width)  # C-contiguous
    elif count <= hi - lo and (hi - lo) * width <= GATHER_LIMIT:
        chunks = _gather(b"".join(read(lo * width, hi * width)), shape, stride, width)
    else:  # a view that reads its elements more than once: the span it covers stands for it
        chunks = read(lo * width, hi * width)
    if byteorder == "big":
        chunks = _swapped(chunks, t.dtype or "")
    for chunk in chunks:
        yield name, t.dtype, chunk


def _swapped(chunks: Iterator[memoryview], dtype: str) -> Iterator[memoryview]:
    # A read may end inside an element: its bytes wait for the next chunk.
    unit, rest = element_bytes(COMPONENT.get(dtype, dtype)) or 1, b""
    for chunk in chunks:
        data = rest + bytes(chunk) if rest else chunk
        cut = len(data) - len(data) % unit
        rest = bytes(data[cut:])
        yield memoryview(little_endian(data[:cut], dtype))


def _gather(span: bytes, shape: list[int], stride: list[int], width: int) -> Iterator[memoryview]:
    import numpy as np

    elements = np.frombuffer(span, dtype=np.uint8).reshape(-1, width)
    view = np.lib.stride_tricks.as_strided(elements, shape=(*shape, width),
                                           strides=(*(s * width for s in stride), 1), writeable=False)
    rows = max(1, CHUNK // (width * math.prod(shape[1:])))
    for i in range(0, shape[0], rows):
        yield np.ascontiguousarray(view[i:i + rows]).reshape(-1).data


def _pickle_regions(wf: WeightsFile) -> Chunks:
    scan = wf.pickle
    assert scan is not None and scan.tensors is not None
    budget = _Budget(wf.size)
    with open(wf.path, "rb") as fh:
        if scan.format == "zip":
            import zipfile

            with zipfile.ZipFile(fh) as zf:
                reader = _zip_readers(wf, zf, fh, budget)
                for name, t in scan.tensors.items():
                    yield from _view_chunks(name, t, reader(t.storage.key), scan.byteorder)
        elif scan.format == "legacy":
            for name, t in scan.tensors.items():
                yield from _view_chunks(name, t, _direct_reader(fh, scan.storage_offsets[t.storage.key], budget))


def regions(wf: WeightsFile) -> Chunks:
    """(tensor name, dtype, byte chunk) over every tensor, in file order. Raises TensorDataError."""
    if wf.header is not None:
        inner = _safetensors_regions(wf)
    elif wf.pickle is not None and wf.pickle.passed and wf.pickle.tensors is not None:
        inner = _pickle_regions(wf)
    else:
        return
    try:
        yield from inner
    except TensorDataError:
        raise
    except zip_errors() as exc:  # a corrupt deflate stream, a bad CRC, an I/O error
        raise TensorDataError("damaged", f"cannot read the tensor data ({type(exc).__name__}: {exc})") from None


def _scan_safetensors(wf: WeightsFile) -> dict[str, TensorStats]:
    # Runs of small tensors of one dtype are classified with one numpy call per run, not one per tensor:
    # a per-expert MoE adapter has hundreds of thousands of them. One buffer is reused for every read.
    stats: dict[str, TensorStats] = {}
    assert wf.header is not None
    tensors = [t for t in wf.header.tensors.values() if t.end > t.begin]
    buf = memoryview(bytearray(min(CHUNK, tensors[-1].end - tensors[0].begin if tensors else 0)))
    with open(wf.path, "rb", buffering=0) as fh:
        i = 0
        while i < len(tensors):
            first, j = tensors[i], i
            while (j < len(tensors) and tensors[j].dtype == first.dtype and tensors[j].nbytes < _BATCHED
                   and tensors[j].end - first.begin <= CHUNK):
                j += 1
            if j == i:  # a large tensor: numpy's max is fastest on it alone
                _scan_chunks(fh, first, buf, stats)
                i += 1
                continue
            data = _read_exactly(fh, first.begin, buf[:tensors[j - 1].end - first.begin], tensors[j - 1].name)
            zeros, nonfinite = classify_many(data, first.dtype, [t.begin - first.begin for t in tensors[i:j]])
            for t, zero, bad in zip(tensors[i:j], zeros, nonfinite):
                stats[t.name] = TensorStats(zero, bad)
            i = j
    return stats


def _read_exactly(fh: RawIOBase | BufferedIOBase, offset: int, into: memoryview, name: str) -> memoryview:
    fh.seek(offset)
    done = 0
    while done < len(into):
        n = fh.readinto(into[done:])
        if not n:
            raise TensorDataError("damaged", f"the file ends inside tensor {name!r}")
        done += n
    return into


def _scan_chunks(fh: RawIOBase | BufferedIOBase, t, buf: memoryview, stats: dict[str, TensorStats]) -> None:
    entry = stats[t.name] = TensorStats()
    for start in range(t.begin, t.end, CHUNK):
        zero, nonfinite = classify_numpy(_read_exactly(fh, start, buf[:min(CHUNK, t.end - start)], t.name), t.dtype)
        entry.all_zero &= zero
        entry.nonfinite |= nonfinite


def scan_values(wf: WeightsFile) -> dict[str, TensorStats]:
    """One streaming pass over every tensor's data."""
    if wf.header is not None and wf.size >= SMALL:
        try:
            return _scan_safetensors(wf)
        except OSError as exc:
            raise TensorDataError("damaged", f"cannot read the tensor data ({exc.strerror or exc})") from None
    classify = classify_bytes if wf.size < SMALL else classify_numpy
    stats: dict[str, TensorStats] = {}
    for name, dtype, chunk in regions(wf):
        entry = stats.get(name)
        if entry is None:
            entry = stats[name] = TensorStats()
        if len(chunk):
            zero, nonfinite = classify(chunk, dtype)
            entry.all_zero &= zero
            entry.nonfinite |= nonfinite
    return stats


def tensor_digests(wf: WeightsFile) -> dict[str, bytes]:
    """A digest of every tensor's bytes, in C order: two files hold the same values when these match."""
    import hashlib

    hashes: dict[str, hashlib.blake2b] = {}
    for name, _dtype, chunk in regions(wf):
        h = hashes.get(name)
        if h is None:
            h = hashes[name] = hashlib.blake2b(digest_size=16)
        h.update(chunk)
    return {k: h.digest() for k, h in hashes.items()}
