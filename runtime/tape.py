"""The record a checkpointed layer's forward leaves for its replay: inner residual sums, attention tensors and
projection paths.

A checkpointed layer runs its forward twice: once without grad (RECORD), then again in the backward (REPLAY,
or RECOMPUTE for a layer replayed in full). The tape carries what the first run learnt into the second:

- the inner residual sums (`replay.residual_add`), in call order;
- the tensors each recorded attention call keeps for its backward (`saved_attention.py`), in call order;
- each projection's parts, as `eligibility.lora_parts` read them (or None: called as a module). A fused
  projection then replays what the forward computed, even where an adapter was switched in between (one called
  as a module runs as the module is then), and the replay skips a second read of every projection's
  eligibility (a few dozen attribute lookups each). The checkpoint drops a projection's parts where its
  module no longer holds the A and B they were read from, so that the gradients reach the ones it holds now.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

RECORD, REPLAY = "record", "replay"
RECOMPUTE = "recompute"  # a layer replayed in full (nothing recorded): the sums and projections are plain


@dataclass
class Tape:
    mode: str
    sums: list[Any] = field(default_factory=list)  # recorded inner residual sums, in call order
    read: int = 0
    defer_outputs: bool = False  # set by the layer: its projections' outputs feed residual sums directly
    parts: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # id(module) -> (module, its parts)
    attention: list[Any] = field(default_factory=list)  # recorded attention tensors, flat, in call order
    # per attention call: (how many tensors it recorded, by which operator), (0, "") where none
    attention_calls: list[tuple[int, str]] = field(default_factory=list)
    attention_read: int = 0

    def kept(self) -> list[Any]:
        """The tensors a recording keeps for the replay: the inner sums, then the attention's."""
        return [*self.sums, *self.attention]

    def layout(self) -> Layout:
        return Layout(self.parts, len(self.sums), tuple(self.attention_calls))

    @classmethod
    def replaying(cls, kept: Sequence[Any], layout: Layout) -> Tape:
        """The REPLAY tape of what a recording kept (`kept()`), or of its sums alone, the attention recomputed."""
        with_attention = len(kept) > layout.sums
        return cls(REPLAY, list(kept[:layout.sums]), attention=list(kept[layout.sums:]),
                   attention_calls=list(layout.attention_calls) if with_attention else [])

    def record_attention(self, kept: Sequence[Any], operator: str) -> None:
        self.attention.extend(kept)
        self.attention_calls.append((len(kept), operator))

    def next_attention(self) -> tuple[list[Any], str] | None:
        """The next attention call's recorded tensors and the operator that recorded them, or None where it runs
        again (it recorded none, or they were not kept)."""
        call, self.attention_read = self.attention_read, self.attention_read + 1
        if call >= len(self.attention_calls) or not self.attention_calls[call][0]:
            return None
        start = sum(count for count, _ in self.attention_calls[:call])
        count, operator = self.attention_calls[call]
        return self.attention[start:start + count], operator

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


class Layout(NamedTuple):
    """What a recording learnt besides its tensors: the projections' parts, and how its kept tensors divide."""
    parts: dict[int, tuple[Any, Any]]
    sums: int  # the first `sums` kept tensors are inner sums, the rest the attention's
    attention_calls: tuple[tuple[int, str], ...]


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
