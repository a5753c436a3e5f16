"""A checkpointed layer's MLP in chunks of tokens, for long contexts.

At 400K tokens an 8B model's MLP holds gate, up and their product, 10.7 GiB each in bf16, and its backward
one more: more GPU memory than the rest of the layer. The MLP acts on each token alone, so inside an offloaded
checkpoint (which recomputes the layer anyway) a long input runs in chunks of `CHUNK_TOKENS` rows:

- the layer's first forward (no grad) computes the output chunk by chunk, keeping nothing;
- the replay keeps the MLP's input only (its output is a placeholder where the layer's sum is recorded), and
  its backward recomputes one chunk at a time, passing each chunk's gradient back before the next;
- a layer replayed in full (its inner sum did not fit on the host) does the same, with the output computed.

So the recomputation does the MLP's work once, as the replay did, and its largest tensors are a chunk's.
Where the layer norms the MLP's output before its residual sum (Gemma 2 and 3), the replay reads that value:
the MLP then runs once more, chunk by chunk without grad. Outside a checkpoint, and for inputs under
`2 * CHUNK_TOKENS` rows, the MLP runs whole.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from .autocast import autocast_state, restored
from .parameters import fsdp_unit, trainable_parameters
from .tape import REPLAY, Tape, active, taping

CHUNK_TOKENS = 32768  # 0.9 GiB of gate (or up) at an 8B model's intermediate size, in bf16


def chunked_mlp(module: Any, run: Callable[[Any], Any], x: Any) -> Any | None:
    """`run(x)`, the MLP `module`'s forward, in chunks of rows inside a checkpoint; None where the MLP should
    run whole. Also whole: an FSDP2 unit (its hooks expect the gradients accumulated in place, in one
    backward), and an MLP that draws random numbers (dropout in training), whose chunks' recomputation in the
    backward, outside the checkpoint's restored RNG, would draw other masks."""
    import torch

    tape = active()
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if tape is None or rows < 2 * CHUNK_TOKENS or fsdp_unit(module) or _draws(module):
        return None
    if not torch.is_grad_enabled():  # the first forward: nothing is kept
        return _in_chunks(run, x)
    # The output is read where the layer norms it (Gemma's sandwich) and where the layer is replayed in full.
    values = tape.mode != REPLAY or not tape.defer_outputs
    # The trainable parameters are inputs, so that their gradients leave through this Function's edges.
    return _function().apply(run, values, tape.parts, x, *trainable_parameters(module))


def _draws(module: Any) -> bool:
    import torch.nn as nn

    dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    return module.training and any(isinstance(m, dropouts) and m.p > 0 for m in module.modules())


def _in_chunks(run: Callable[[Any], Any], x: Any) -> Any:
    rows = x.reshape(-1, x.shape[-1])
    out = None
    for start in range(0, rows.shape[0], CHUNK_TOKENS):
        part = run(rows[start:start + CHUNK_TOKENS])
        if out is None:
            out = part.new_empty((rows.shape[0], part.shape[-1]))
        out[start:start + part.shape[0]] = part
    return out.view(*x.shape[:-1], out.shape[-1])


@functools.cache
def _function() -> type:
    import torch

    class ChunkedMLP(torch.autograd.Function):
        """The MLP's output (or a placeholder the replay does not read); saves its input alone."""

        @staticmethod
        def forward(ctx: Any, run: Callable[[Any], Any], values: bool, parts: dict, x: Any, *params: Any) -> Any:
            ctx.run, ctx.parts = run, parts  # the projections' paths the layer's forward recorded (tape.py)
            ctx.autocast = autocast_state(x.device.type)
            ctx.save_for_backward(x, *params)
            if values:
                return _in_chunks(run, x)
            return x.new_zeros(()).expand(x.shape)  # an MLP maps the hidden size to itself

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
            x, *params = ctx.saved_tensors
            rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
            dx = torch.empty_like(rows)
            dparams: list[Any] = [None] * len(params)
            for start in range(0, rows.shape[0], CHUNK_TOKENS):
                part = rows[start:start + CHUNK_TOKENS].detach().requires_grad_(True)
                # The chunk's output value is never read: the output projection may be a placeholder.
                with torch.enable_grad(), taping(Tape(REPLAY, defer_outputs=True, parts=ctx.parts)), \
                        restored(ctx.autocast):
                    out = ctx.run(part)
                got = torch.autograd.grad(out, [part, *params], grads[start:start + part.shape[0]],
                                          allow_unused=True)
                dx[start:start + part.shape[0]] = got[0]
                for i, g in enumerate(got[1:]):  # summed over the chunks in fp32, as the kernels accumulate
                    if g is not None:
                        dparams[i] = g.float() if dparams[i] is None else dparams[i].add_(g)
            dparams = [None if g is None else g.to(p.dtype) for g, p in zip(dparams, params)]
            return (None, None, None, dx.view(x.shape), *dparams)

    return ChunkedMLP
