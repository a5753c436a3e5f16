"""Whether a tensor holds only part of its parameter: the one rule the fused path and the saver both follow."""
from __future__ import annotations

import functools
from typing import Any


@functools.cache
def dtensor_type() -> type | None:
    """torch's DTensor class (public since torch 2.5, private before), or None without distributed support."""
    import importlib

    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        try:
            return importlib.import_module(name).DTensor
        except (ImportError, AttributeError):
            continue
    return None


def is_partial(tensor: Any) -> bool:
    """A DTensor (an FSDP2 or tensor-parallel shard), or a ZeRO-3 placeholder: empty until gathered, its full
    size in `ds_numel` (a detached copy, as `state_dict()` returns, loses `ds_numel` but stays empty)."""
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return True
    numel = tensor.numel()
    return numel == 0 or getattr(tensor, "ds_numel", 0) > numel
