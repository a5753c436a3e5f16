"""Generated subclasses: the library class with our forward, a marker, and nothing else changed.

A patched instance gets one of these as its `__class__`; the library class itself is never assigned to.
One subclass exists per (library class as found, spec, kernel set), so patching many layers creates one
class, and the marker is readable from the class or any instance as `_adapter_doctor_patch`.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

from .context import context_for
from .modules import IMPLEMENTATIONS

MARKER = "_adapter_doctor_patch"


@dataclass(frozen=True)
class PatchMarker:
    version: str  # adapter_doctor.__version__
    kernels: str  # the kernel set's name
    implementation: str
    original: type  # the class the instance had before; unpatch restores it

    def __str__(self) -> str:
        return f"adapter_doctor={self.version}, kernels={self.kernels}, impl={self.implementation}"


def _version() -> str:
    from adapter_doctor.provenance import runtime_version

    return runtime_version()


@functools.cache
def patched_class(original: type, library: type, spec: Any, kernels: Any) -> type:
    """The subclass of `original` whose forward is `spec`'s implementation; `library` is the spec's class."""
    impl, _ = IMPLEMENTATIONS[spec.implementation]
    ctx = context_for(library, spec.options, kernels)
    marker = PatchMarker(_version(), kernels.name, spec.implementation, original)

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return impl(self, ctx, *args, **kwargs)

    def extra_repr(self: Any) -> str:
        own = original.extra_repr(self)
        return f"{own}, {marker}" if own else str(marker)

    forward.__qualname__ = f"{original.__qualname__}.forward"
    forward.__doc__ = impl.__doc__
    # Callers read the forward's parameters: generation decides from them whether to pass logits_to_keep, the
    # Trainer which dataset columns to keep. Ours takes what the library's takes, so it shows the library's.
    try:
        forward.__signature__ = inspect.signature(library.forward)
    except (TypeError, ValueError):
        pass
    namespace = {"forward": forward, "extra_repr": extra_repr, MARKER: marker, "__module__": __name__,
                 "__qualname__": original.__qualname__, "__doc__": original.__doc__}
    # The name stays the library's: error messages, _no_split_modules and output recording go by it.
    return type(original.__name__, (original,), namespace)


RESTORED = "library"  # the implementation name of a restored library forward


@functools.cache
def restored_class(original: type, forward: Any) -> type:
    """The subclass of `original` whose forward is `forward`, the library's own read afresh (pristine.py):
    for modules a patcher changed that we have no implementation of."""
    marker = PatchMarker(_version(), "-", RESTORED, original)
    namespace = {"forward": forward, MARKER: marker, "__module__": __name__, "__qualname__": original.__qualname__,
                 "__doc__": original.__doc__}
    return type(original.__name__, (original,), namespace)


def marker_of(module: Any) -> PatchMarker | None:
    marker = getattr(type(module), MARKER, None)
    return marker if isinstance(marker, PatchMarker) else None


@functools.cache
def unpatched_class(cls: type, original: type) -> type:
    """`original` for one of our classes; for a class a wrapper derived from ours after patching (FSDP2's
    `FSDP<Layer>`), the same class derived from `original` instead, so that unpatching keeps the wrapper's."""
    if MARKER in vars(cls):
        return original
    bases = tuple(unpatched_class(b, original) if isinstance(getattr(b, MARKER, None), PatchMarker) else b
                  for b in cls.__bases__)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, bases, namespace)
