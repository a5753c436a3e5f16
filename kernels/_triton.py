"""Triton plumbing shared by the kernel modules: jitting on first launch, dispatch, launch sizes.

Kernels are written at module level with `@jit` from here instead of `@triton.jit`, so that importing a kernel
module imports neither triton nor torch. The first launch of any kernel of a module turns every kernel of that
module into a real `triton.jit` function (a kernel calls its helpers through module globals, so they must all
be real by then) and binds the module's `tl`. Under `TRITON_INTERPRET=1` they become interpreted functions
that run on CPU tensors.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

tl: Any = None  # triton.language, bound when a module using the helpers below is materialized


class LazyKernel:
    """A Triton kernel not compiled yet; `kernel[grid](...)` compiles its module's kernels and launches."""

    def __init__(self, fn: Callable[..., None]):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return _materialize(self.fn.__module__)[self.fn.__name__][grid]


def jit(fn: Callable[..., None]) -> LazyKernel:
    return LazyKernel(fn)


def _materialize(module_name: str) -> dict[str, Any]:
    import triton
    import triton.language as tl

    namespace = sys.modules[module_name].__dict__
    namespace["tl"] = tl
    for name, value in list(namespace.items()):
        if isinstance(value, LazyKernel):
            value.fn.__globals__["tl"] = tl  # a helper imported from another module reads that module's tl
            namespace[name] = triton.jit(value.fn)
    return namespace


def lazy_functions(module_name: str, **factories: Callable[[], type]) -> Callable[[str], Any]:
    """A module-level `__getattr__` that serves the module's autograd Functions, each defined on first use
    (defining one needs torch, which importing a kernel module must not import)."""

    def __getattr__(name: str) -> Any:
        if name in factories:
            return factories[name]()
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__


@jit
def tanh_and_sech2(z):
    """(tanh z, 1 - tanh² z) in fp32, through exp of a non-positive number (no overflow) and without the
    cancellation of 1 - t·t near saturation."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = tl.where(z >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def on_triton(*tensors: Any) -> bool:
    """Whether the Triton path serves these tensors: all on a CUDA device, and triton importable."""
    return all(t is None or t.is_cuda for t in tensors) and triton_importable()


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_warps(block: int) -> int:
    """Warps for a program that owns one row of `block` elements: about 8 to 16 elements per thread."""
    return max(1, min(32, block // 256))


@functools.cache
def _multiprocessors(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def program_count(device: Any, n_rows: int, per_multiprocessor: int = 2) -> int:
    """Programs for a persistent grid over `n_rows`: a few per multiprocessor, never more than the rows."""
    import torch

    if device.type == "cuda":
        units = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
        units *= per_multiprocessor
    else:  # the interpreter runs programs one after another: fewer, longer programs are faster
        units = 4
    return max(1, min(n_rows, units))


def autocast_on(device: Any) -> bool:
    """Whether autocast is active for `device`'s type, where the fused paths step aside for the references."""
    import torch

    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch before 2.4 takes no device type
        return torch.is_autocast_enabled() if device.type == "cuda" else False
