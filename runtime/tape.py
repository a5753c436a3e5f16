"""The record a checkpointed layer's forward leaves for its replay: inner residual sums and projection paths.

A checkpointed layer runs its forward twice: once without grad (RECORD), then again in the backward (REPLAY,
or RECOMPUTE for a layer replayed in full). The tape carries what the first run learnt into the second:

- the inner residual sums (`replay.residual_add`), in call order;
- each projection's parts, as `eligibility.lora_parts` read them (or None: called as a module). A fused
  projection then replays what the forward computed, even where an adapter was switched in between (one called
  as a module runs as the module is then), and the replay skips a second read of every projection's
  eligibility (a few dozen attribute lookups each). The checkpoint drops a projection's parts where its
  module no longer holds the A and B they were read from, so that the gradients reach the ones it holds now.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

RECORD, REPLAY = "record", "replay"
RECOMPUTE = "recompute"  # a layer replayed in full (nothing recorded): the sums and projections are plain


@dataclass
class Tape:
    mode: str
    sums: list[Any] = field(default_factory=list)  # recorded inner residual sums, in call order
    read: int = 0
    defer_outputs: bool = False  # set by the layer: its projections' outputs feed residual sums directly
    parts: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # id(module) -> (module, its parts)

    def next_sum(self) -> Any:
        if self.read >= len(self.sums):
            raise RuntimeError("checkpoint replay: the layer took a different path than in its forward")
        self.read += 1
        return self.sums[self.read - 1]

    def projection_parts(self, module: Any, read: Callable[[Any], Any]) -> Any:
        """`read(module)` as the tape's forward found it; read now (and recorded, while recording) otherwise."""
        found = self.parts.get(id(module))
        if found is not None and found[0] is module:
            return found[1]
        parts = read(module)
        if self.mode == RECORD:
            self.parts[id(module)] = (module, parts)
        return parts


_LOCAL = threading.local()


def active() -> Tape | None:
    return getattr(_LOCAL, "tape", None)


class taping:
    """`with taping(tape):` makes `tape` the active one on this thread for the layer's forward (None: none)."""

    def __init__(self, tape: Tape | None):
        self.tape = tape

    def __enter__(self) -> Tape | None:
        self.outer, _LOCAL.tape = active(), self.tape
        return self.tape

    def __exit__(self, *exc: Any) -> None:
        _LOCAL.tape = self.outer
