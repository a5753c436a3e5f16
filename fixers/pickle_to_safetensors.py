"""pickle-to-safetensors: replace adapter_model.bin by an equal adapter_model.safetensors.

A torch zip archive (what torch.save writes since 1.6) is converted without torch and without unpickling:
the opcode scan gives each tensor's storage, dtype, shape, stride and offset, and the storage bytes are read
from the archive as torch's reader reads them. Only the legacy (pre-1.6) format still needs torch.
"""
from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import Callable

from adapter_doctor.peft_load import safetensors_strands
from adapter_doctor.pickle_scan import PickledTensor, PickleScan, read_storage, scan, zip_errors
from adapter_doctor.safetensors_header import COMPONENT, element_bytes, little_endian, unsigned_view

from .atomic import FixWriteError
from .context import FixContext
from .plan import FixerPlan, Refusal, TensorChange
from .tensors import RawTensor, read_tensors

ID = "pickle-to-safetensors"
NEEDS_TORCH = "converting a legacy-format torch pickle needs torch: pip install 'adapter-doctor[torch]'"
_MIN_BUDGET = 1 << 28


def plan(ctx: FixContext) -> FixerPlan:
    out = FixerPlan()
    weights = ctx.artifact.primary_weights
    answer = next(f.id for f in ctx.findings)
    if weights is None or weights.pickle is None or weights.path.suffix == ".safetensors":
        return out
    if not weights.pickle.passed or weights.pickle.tensors is None:
        out.refusals.append(Refusal(answer, "the pickle did not pass the opcode scan; it will not be loaded"))
        return out
    stranded = safetensors_strands(ctx.config, ctx.check.peft_type, ctx.check.target_release)
    if stranded:
        out.refusals.append(Refusal(answer, f"{stranded}; {weights.path.name} is kept"))
        return out
    out.from_pickle = True
    out.remove = {weights.path.name}
    what = f"pickle -> safetensors ({len(weights.pickle.tensors)} tensors)"
    if weights.pickle.format != "zip" and not torch_available():
        what += f"; {NEEDS_TORCH}"
    out.changes = [TensorChange(weights.path.name, "adapter_model.safetensors", what, answer)]
    return out


def torch_available() -> bool:
    """Whether torch can be imported here, found without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def scan_exactly(data: bytes, name: str) -> PickleScan:
    """The opcode scan of these bytes, so that what is converted is what was scanned (a file swapped meanwhile
    is never read twice)."""
    with tempfile.TemporaryDirectory(prefix="adapter-doctor-scan-") as private:
        copy = Path(private) / name
        copy.write_bytes(data)
        return scan(copy)


def read_zip_tensors(path: Path) -> dict[str, RawTensor] | None:
    """Every tensor of a torch zip archive as C-order little-endian bytes, in pickle order, without torch.

    None when the file is not a zip archive (the legacy format). Raises FixWriteError when it no longer
    passes the scan or its data cannot be read."""
    archive = _read_archive(path)
    if archive is None:
        return None
    tensors, storages, byteorder = archive
    return {name: RawTensor(t.dtype, t.shape, _tensor_bytes(storages[t.storage.key], t, byteorder))
            for name, t in tensors.items()}


def _read_archive(path: Path) -> tuple[dict[str, PickledTensor], dict[str, bytes], str] | None:
    """The scanned tensors of a torch zip archive, the bytes of each storage (read once) and the byte order;
    None for the legacy format."""
    import zipfile

    data = path.read_bytes()
    verdict = scan_exactly(data, path.name)
    if not verdict.passed or verdict.tensors is None:
        why = verdict.refused or verdict.error or ", ".join(verdict.unsafe) or "not a dict of tensors"
        raise FixWriteError(f"{path} no longer passes the opcode scan ({why}); it was not converted")
    if verdict.format != "zip":
        return None
    tensors = verdict.tensors
    # Views of one storage could otherwise expand without bound.
    if sum(t.numel * (element_bytes(t.dtype or "") or 0) for t in tensors.values()) > max(_MIN_BUDGET, 16 * len(data)):
        raise FixWriteError(f"{path}: its tensors expand to more than 16 times the file's size "
                            "(views that repeat one storage); it was not converted")
    fh = io.BytesIO(data)
    try:
        with zipfile.ZipFile(fh) as zf:
            keys = dict.fromkeys(t.storage.key for t in tensors.values())
            storages = {key: read_storage(verdict, zf, fh, key) for key in keys}
    except zip_errors() as exc:
        raise FixWriteError(f"{path}: cannot read its tensor data ({type(exc).__name__}: {exc}); "
                            "it was not converted") from None
    return tensors, storages, verdict.byteorder


def _tensor_bytes(storage: bytes, t: PickledTensor, byteorder: str) -> bytes:
    """The tensor's elements in C order, as `tensor.contiguous()` lays them out, made little-endian.

    Each tensor gets its own bytes: tensors that share a storage (views, tied weights) are copied apart, as
    safetensors needs. A strided view (a transpose, a slice, `expand`) is gathered element by element."""
    width = element_bytes(t.dtype or "")
    if width is None:
        raise FixWriteError(f"dtype {t.dtype} has no safetensors equivalent here")
    count = math.prod(t.shape)
    if count == 0:
        return b""
    if t.contiguous:
        raw = storage[t.offset * width:(t.offset + count) * width]
    else:
        import numpy as np

        # Elements are moved whole, as unsigned integers of their width: the bits are copied, never converted.
        elements = np.frombuffer(storage, dtype=unsigned_view(t.dtype or ""))[t.offset:]
        view = np.lib.stride_tricks.as_strided(elements, shape=t.shape, strides=tuple(s * width for s in t.stride),
                                               writeable=False)
        raw = np.ascontiguousarray(view).tobytes()
    return bytes(little_endian(raw, t.dtype or "")) if byteorder == "big" else raw


_GATHER_CHUNK = 1 << 20  # elements whose storage indices are computed at once, to bound the verifier's memory


def _gathered(storage: bytes, t: PickledTensor, byteorder: str) -> bytes:
    """What `_tensor_bytes` must return, by another route, for the verifier: each element's storage index is
    computed from its C-order position (offset + sum of index * stride) and its bytes are taken as a row of the
    storage's bytes, reversed unit by unit for a big-endian archive. Neither strided views nor byteswap."""
    import numpy as np

    width = element_bytes(t.dtype or "") or 0
    unit = element_bytes(COMPONENT.get(t.dtype or "", t.dtype or "")) or 0
    count = math.prod(t.shape)
    if count == 0 or width == 0:
        return b""
    rows = np.frombuffer(storage, dtype=np.uint8).reshape(-1, width)
    parts = []
    for start in range(0, count, _GATHER_CHUNK):
        position = np.arange(start, min(count, start + _GATHER_CHUNK), dtype=np.int64)
        index = np.full_like(position, t.offset)
        for size, stride in zip(reversed(t.shape), reversed(t.stride)):
            position, digit = np.divmod(position, size)
            index += digit * stride
        picked = rows[index]
        if byteorder == "big":
            picked = picked.reshape(len(index), width // unit, unit)[:, :, ::-1]
        parts.append(picked.tobytes())
    return b"".join(parts)


def verify_zip_conversion(source: Path, written: Path, renames: dict[str, str],
                          convert: Callable[[RawTensor], RawTensor] | None = None) -> bool:
    """Read the archive and the written safetensors file back and compare every tensor byte for byte.

    The expected bytes are gathered by `_gathered`, not by the conversion's own `_tensor_bytes`, so that a fault
    in the conversion's gather is caught rather than repeated. False when `source` is not a zip archive (nothing
    was compared); raises FixWriteError on any difference. `convert` is what the writer did to each tensor after
    reading it (a cast)."""
    archive = _read_archive(source)
    if archive is None:
        return False
    tensors, storages, byteorder = archive
    got, _ = read_tensors(written)  # through the strict header parser
    final = {renames.get(n, n): n for n in tensors}
    if len(final) != len(tensors) or set(final) != set(got):
        raise FixWriteError("the converted file does not hold the same tensor names; nothing was changed")
    for name, original in final.items():
        t = tensors[original]
        want = RawTensor(t.dtype or "", t.shape, _gathered(storages[t.storage.key], t, byteorder))
        if convert:
            want = convert(want)
        if (got[name].dtype, got[name].shape, got[name].data) != (want.dtype, want.shape, want.data):
            raise FixWriteError(f"{name} differs after conversion; nothing was changed")
    return True
