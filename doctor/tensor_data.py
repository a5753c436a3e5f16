"""Stream the raw bytes of saved tensors, from safetensors or torch pickles, without torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .artifact import WeightsFile
from .float_bits import classify_bytes, classify_numpy
from .pickle_scan import PickledTensor, element_size

CHUNK = 1 << 24  # bytes per step; large enough to amortise numpy call overhead
SMALL = 1 << 20  # below this much data, importing numpy costs more than the scan itself


@dataclass
class TensorStats:
    all_zero: bool = True
    nonfinite: bool = False  # NaN or Inf somewhere


def _safetensors_regions(wf: WeightsFile) -> Iterator[tuple[str, str, memoryview]]:
    # One reused buffer: chunks are only valid until the next one is read.
    assert wf.header is not None
    buf = memoryview(bytearray(min(CHUNK, max((t.nbytes for t in wf.header.tensors.values()), default=0))))
    with open(wf.path, "rb", buffering=0) as fh:
        for t in wf.header.tensors.values():
            fh.seek(t.begin)
            for start in range(t.begin, t.end, CHUNK):
                n = fh.readinto(buf[:min(CHUNK, t.end - start)])
                yield t.name, t.dtype, buf[:n]


def _pickle_regions(wf: WeightsFile) -> Iterator[tuple[str, str, memoryview]]:
    scan = wf.pickle
    assert scan is not None and scan.tensors is not None
    if scan.format == "zip":
        import zipfile

        with zipfile.ZipFile(wf.path) as zf:
            for name, t in scan.tensors.items():
                data = zf.read(f"{scan.archive_prefix}data/{t.storage.key}")
                yield name, t.dtype, memoryview(_tensor_bytes(data, t))
    elif scan.format == "legacy":
        with open(wf.path, "rb") as fh:
            for name, t in scan.tensors.items():
                width = element_size(t.dtype or "") or 1
                fh.seek(scan.storage_offsets[t.storage.key])
                data = fh.read((t.storage.numel or 0) * width)
                yield name, t.dtype, memoryview(_tensor_bytes(data, t))


def _tensor_bytes(storage: bytes, t: PickledTensor) -> bytes:
    """The bytes of `t` from its storage, in C order (views and non-contiguous tensors included)."""
    width = element_size(t.dtype or "") or 1
    if t.numel == 0:
        return b""
    if t.contiguous:
        start = t.offset * width
        return storage[start:start + t.numel * width]
    import numpy as np

    flat = np.frombuffer(storage, dtype=np.uint8).reshape(-1, width)
    idx = np.full(t.shape, t.offset, dtype=np.int64)
    for axis, (size, stride) in enumerate(zip(t.shape, t.stride)):
        shape = [1] * len(t.shape)
        shape[axis] = size
        idx = idx + (np.arange(size, dtype=np.int64) * stride).reshape(shape)
    return flat[idx.ravel()].tobytes()


def regions(wf: WeightsFile) -> Iterator[tuple[str, str | None, memoryview]]:
    """(tensor name, dtype, byte chunk) over every tensor, in file order."""
    if wf.header is not None:
        return _safetensors_regions(wf)
    if wf.pickle is not None and wf.pickle.passed and wf.pickle.tensors is not None:
        return _pickle_regions(wf)
    return iter(())


def scan_values(wf: WeightsFile) -> dict[str, TensorStats]:
    """One streaming pass over every tensor's data."""
    classify = classify_bytes if wf.size < SMALL else classify_numpy
    stats: dict[str, TensorStats] = {}
    for name, dtype, chunk in regions(wf):
        entry = stats.setdefault(name, TensorStats())
        if len(chunk):
            zero, nonfinite = classify(chunk, dtype)
            entry.all_zero &= zero
            entry.nonfinite |= nonfinite
    return stats


def tensor_bytes(wf: WeightsFile) -> dict[str, bytes]:
    """Every tensor's bytes (small adapters only: used to compare a .bin with its .safetensors twin)."""
    out: dict[str, bytearray] = {}
    for name, _dtype, chunk in regions(wf):
        out.setdefault(name, bytearray()).extend(chunk)
    return {k: bytes(v) for k, v in out.items()}
