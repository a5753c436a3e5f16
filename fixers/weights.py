"""Produce the new adapter_model.safetensors for a plan: renames, layout, casts, pickle conversion."""
from __future__ import annotations

from pathlib import Path

from adapter_doctor.safetensors_header import element_bytes

from .atomic import FixWriteError, Writer
from .plan import WeightsJob
from .tensors import RawTensor, read_tensors, write_renamed, write_tensors

PT_METADATA = {"format": "pt"}  # what PEFT writes; transformers refuses safetensors without a known format
_TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def writer(job: WeightsJob) -> Writer:
    def write(path: Path) -> None:
        if job.streaming:
            metadata = read_tensors_metadata(job.source)
            write_renamed(job.source, path, job.renames, metadata or PT_METADATA)
            return
        if job.tensors is not None:
            tensors, metadata = job.tensors, job.metadata
        elif job.from_pickle:
            tensors, metadata = _from_pickle(job.source), PT_METADATA
        else:
            tensors, metadata = read_tensors(job.source)
        # A fixer's whole new tensor set is keyed by the file's names (or by final ones, which no rename names),
        # so the renames of the other fixers apply to it as to the file's own tensors.
        tensors = _renamed(tensors, job.renames)
        if job.cast:
            tensors = {n: cast(t, job.cast) for n, t in tensors.items()}
        write_tensors(path, tensors, metadata or PT_METADATA)
        if job.from_pickle:
            _verify_against_pickle(job, path)

    return write


def _renamed(tensors: dict[str, RawTensor], renames: dict[str, str]) -> dict[str, RawTensor]:
    out = {renames.get(n, n): t for n, t in tensors.items()}
    if len(out) != len(tensors):
        raise FixWriteError("the renames map two tensors to one name; nothing was changed")
    return out


def read_tensors_metadata(path: Path) -> dict[str, str] | None:
    from adapter_doctor.safetensors_header import read_header

    return read_header(path).metadata


def cast(t: RawTensor, dtype: str) -> RawTensor:
    """Round float tensors to `dtype` (BF16 or F16) to nearest, ties to even; others pass through."""
    import numpy as np

    if t.dtype not in ("F64", "F32", "F16", "BF16") or t.dtype == dtype:
        return t
    if t.dtype == "BF16":
        values = (np.frombuffer(t.data, "<u2").astype("<u4") << 16).view("<f4")
    else:
        values = np.frombuffer(t.data, f"<f{element_bytes(t.dtype)}").astype("<f4")
    if dtype == "F16":
        return RawTensor("F16", t.shape, values.astype("<f2").tobytes())
    bits = values.view("<u4")
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    nan = np.isnan(values)
    rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype("<u2")  # keep NaN a NaN (rounding could carry it to Inf)
    return RawTensor("BF16", t.shape, rounded.tobytes())


def _load_pickle(path: Path) -> dict:
    """torch's load of exactly the bytes the opcode scan passes here and now: the file is read once, those
    bytes are scanned, and only those bytes are loaded, so a file swapped after planning is never loaded."""
    import io

    from .pickle_to_safetensors import NEEDS_TORCH, scan_exactly

    try:
        import torch
    except ImportError:
        raise FixWriteError(NEEDS_TORCH) from None
    data = path.read_bytes()
    verdict = scan_exactly(data, path.name)
    if not verdict.passed:
        why = verdict.refused or verdict.error or ", ".join(verdict.unsafe)
        raise FixWriteError(f"{path} no longer passes the opcode scan ({why}); it was not loaded")
    # weights_only is the second lock on the door.
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FixWriteError(f"{path} is not a flat dict of tensors")
    return state


def _from_pickle(path: Path) -> dict[str, RawTensor]:
    from .pickle_to_safetensors import read_zip_tensors

    zipped = read_zip_tensors(path)  # a torch zip archive needs neither torch nor unpickling
    if zipped is not None:
        return zipped
    state = _load_pickle(path)  # the legacy format: torch's loader, or a one-line error naming the extra
    import torch

    out = {}
    for name, tensor in state.items():
        # clone(): tensors that share storage (views, tied weights) each get their own bytes, as safetensors needs
        flat = tensor.detach().clone().contiguous()
        dtype = _TORCH_TO_ST.get(str(flat.dtype).removeprefix("torch."))
        if dtype is None:
            raise FixWriteError(f"{name}: dtype {flat.dtype} has no safetensors equivalent here")
        out[name] = RawTensor(dtype, tuple(flat.shape), flat.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def _verify_against_pickle(job: WeightsJob, written: Path) -> None:
    """Reload what was written and compare every tensor with the pickle's (torch's own load for the legacy format)."""
    from .pickle_to_safetensors import verify_zip_conversion

    if verify_zip_conversion(job.source, written, job.renames, (lambda t: cast(t, job.cast)) if job.cast else None):
        return
    import torch
    from safetensors.torch import load_file

    original = _load_pickle(job.source)
    reloaded = load_file(str(written))
    expected = {job.renames.get(n, n): t for n, t in original.items()}
    if set(expected) != set(reloaded):
        raise FixWriteError("the converted file does not hold the same tensor names; nothing was changed")
    target = {"BF16": torch.bfloat16, "F16": torch.float16}.get(job.cast or "")
    for name, tensor in expected.items():
        want = tensor.to(target) if target is not None and tensor.is_floating_point() else tensor
        if not torch.equal(want, reloaded[name]):
            raise FixWriteError(f"{name} differs after conversion; nothing was changed")
