"""Where the Triton kernels run in these tests, and the helpers their tests share.

Without a CUDA device the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by the root conftest
before anything imports triton) on CPU tensors. With a CUDA device the same tests run the compiled kernels on
the GPU.

Triton defines an fp32 -> bf16 conversion (a cast, or a store into a bf16 tensor) as rounding to nearest even,
which the GPU does; the interpreter truncates instead. `_round_like_the_gpu` makes the interpreter round, so
that the CPU tests check the values the GPU produces, and bf16 tolerances need not allow for the difference.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch


def _round_like_the_gpu() -> None:
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return truncating(self, src, dst_type)
        values = np.asarray(src.data, dtype=np.float32)
        bits = values.view(np.uint32).astype(np.uint64)  # room for the carry
        nearest_even = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
        return interpreter.TensorHandle(np.where(np.isnan(values), quiet_nan, nearest_even), tl.bfloat16)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if not torch.cuda.is_available():  # the root conftest set TRITON_INTERPRET before triton was imported
    _round_like_the_gpu()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives NaN, which fails every bound."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.fixture
def rel():
    """rel(out, ref) = ‖out − ref‖ / ‖ref‖ (float64)."""
    return rel_error


@pytest.fixture
def device() -> str:
    pytest.importorskip("triton")
    return DEVICE


@pytest.fixture
def cuda() -> str:
    """For the GPU tests at real shapes: skipped without a CUDA device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton")
    torch.cuda.reset_peak_memory_stats()
    return "cuda"


@pytest.fixture
def poisoned(monkeypatch) -> list[tuple[int, ...]]:
    """Fill every tensor that torch.empty / empty_like allocates with NaN (integers with a sentinel), so that an
    element a kernel forgot to write shows up instead of passing with whatever memory held; returns the shapes
    allocated, for checks on the largest buffer a kernel needed."""
    shapes: list[tuple[int, ...]] = []
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t.fill_(float("nan") if t.is_floating_point() else -(2**30)) if t.numel() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    return shapes


@contextmanager
def recording_saved(into: list[torch.Tensor]):
    """Collect every tensor autograd saves for backward inside the block."""
    def pack(t: torch.Tensor) -> torch.Tensor:
        into.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


@pytest.fixture
def saved_activation_bytes():
    """saved_activation_bytes(fn, *params) -> bytes of the tensors `fn()` saves for backward, parameters
    excluded and tensors sharing memory counted once (saving the input again costs nothing)."""
    def measure(fn, *params: torch.Tensor) -> int:
        saved: list[torch.Tensor] = []
        with recording_saved(saved):
            fn()
        skip = {p.untyped_storage().data_ptr() for p in params}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return sum(n for ptr, n in storages.items() if ptr not in skip)

    return measure
