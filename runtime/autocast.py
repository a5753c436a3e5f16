"""The autocast settings a forward ran under, to recompute under the same ones in the backward.

A recomputation in the backward (a checkpointed layer's replay, a chunked MLP's chunks) runs where autograd
calls it, outside the forward's `torch.autocast` block: Trainer and accelerate wrap the forward alone. Left as
it is, it would compute in other dtypes than the forward did, and the gradients would be those of another
function (about 1% off on a small Llama under CPU autocast in bf16).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple


class AutocastState(NamedTuple):
    settings: tuple[tuple[str, bool, Any], ...]  # (device type, enabled, dtype) for the device and the CPU
    cache: bool

    @property
    def on_device(self) -> bool:
        """Autocast on for the device type the state was read for (CPU autocast does not touch a GPU's ops)."""
        return bool(self.settings) and self.settings[0][1]


def autocast_state(device_type: str) -> AutocastState:
    """The autocast settings now, for `device_type` and for the CPU (which autocasts on its own)."""
    import torch

    types = [t for t in dict.fromkeys([device_type, "cpu"]) if torch.amp.is_autocast_available(t)]  # not "meta"
    return AutocastState(tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types),
                         torch.is_autocast_cache_enabled())


@contextlib.contextmanager
def restored(state: AutocastState) -> Iterator[None]:
    """Run the block under `state`'s settings, enabled or disabled as they were, then restore the current ones."""
    import torch

    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state.settings:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=state.cache))
        yield
