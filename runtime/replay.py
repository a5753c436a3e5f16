"""Selective recomputation for checkpointed decoder layers: keep the residual sums, skip the output projections.

A checkpointed layer's backward reruns its forward to rebuild what the backward reads. Two of its GEMMs are
rerun for nothing: o_proj's and down_proj's outputs only feed residual sums, and the backward of a frozen
projection (plus its LoRA) reads the projection's input, never its output. So the checkpoint records the
layer's inner residual sum (attention output + input) during the forward, and during the replay:

- `residual_add` returns the recorded sum (or, for the layer's last sum, whose value nothing reads, a
  placeholder) while passing the incoming gradient to both addends, as an add does;
- `output_projection` gives o_proj/down_proj a gradient-only placeholder: the fused LoRA Function without its
  GEMMs, whose backward computes dx, dA and dB exactly as the full one does.

That leaves about 35% of a Llama layer's forward GEMM work out of the replay, for one more hidden-size tensor
per layer held (offloaded to host memory by `checkpoint.py`); `saved_attention.py` leaves out the attention
block's forward (the q/k/v GEMMs, RoPE, the attention) the same way. Outside a checkpoint, and in a layer replayed in
full because its sum was not kept (`RECOMPUTE`), both helpers are the plain operations. Layers whose
projections cannot take the fused path run them as modules: still exact, only slower.
"""
from __future__ import annotations

import functools
from typing import Any

from .projection import gradient_only_many, project
from .tape import RECOMPUTE, RECORD, REPLAY, active


@functools.cache
def _sum_function() -> type:
    import torch

    class RecordedSum(torch.autograd.Function):
        """residual + delta whose value is known already: returns it, and backward is an add's."""

        @staticmethod
        def forward(ctx: Any, residual: Any, delta: Any, value: Any) -> Any:
            return value.view_as(value)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, Any, None]:
            return grad, grad, None

    return RecordedSum


def residual_add(residual: Any, delta: Any, *, last: bool) -> Any:
    """`residual + delta`; inside a checkpoint, recorded (inner sums) or replayed from the record. `last`
    marks the layer's output sum, which the backward never reads."""
    tape = active()
    if tape is None or tape.mode == RECOMPUTE:
        return residual + delta
    if tape.mode == RECORD:
        out = residual + delta
        if not last:
            tape.sums.append(out)
        return out
    value = residual.new_zeros(()).expand(residual.shape) if last else tape.next_sum()
    return _sum_function().apply(residual, delta, value)


def output_projection(module: Any, x: Any, kernels: Any) -> Any:
    """`project(module, x)`, or during a replay whose layer defers its outputs, a gradient-only placeholder."""
    tape = active()
    if tape is not None and tape.mode == REPLAY and tape.defer_outputs:
        return gradient_only_many([module], x, kernels)[0]  # the projection itself where no placeholder exists
    return project(module, x, kernels)
