"""Layer checkpointing whose saved tensors wait in pinned CPU memory, for long contexts and tight budgets.

Plain checkpointing keeps every decoder layer's input on the GPU: at 128K tokens that is 1 GiB a layer on
an 8B model. Here the forward runs without keeping activations and copies what the backward will need (the
layer's input and, for our patched layers, its inner residual sum: see `replay.py`) to pinned host memory on a
side stream, overlapping the next layer's work. The backward of layer i starts copying layer i-1's tensors back
on that stream before it recomputes its own layer, so that the transfers overlap the compute. GPU memory then
holds the weights, one layer's working set and two layers' saved tensors.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

from .replay import RECORD, REPLAY, Tape, taping

_STREAMS: dict[Any, Any] = {}
_LAST: dict[Any, Any] = {}  # device -> weak reference to the most recent layer's _Saved


def _side_stream(device: Any) -> Any:
    import torch

    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class _Saved:
    """One layer's saved tensors between its forward and backward: host copies, then device copies."""

    def __init__(self, tensors: list[Any], device: Any):
        import torch

        self.device, self.cuda = device, device.type == "cuda"
        if not self.cuda:  # on CPU there is nothing to move
            self.host, self.fetched = None, [t.detach() for t in tensors]
            return
        stream = _side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        with torch.cuda.stream(stream):
            for host, t in zip(self.host, tensors):
                host.copy_(t.detach(), non_blocking=True)
                t.record_stream(stream)  # the caching allocator must not reuse it before the copy ends
        self.fetched, self.ready = None, None
        self.previous = _LAST.get(device)  # a weak reference: a finished step's layers must not stay alive
        _LAST[device] = weakref.ref(self)

    def prefetch(self) -> None:
        """Start the copy back to the GPU on the side stream (queued after the copy out), once."""
        import torch

        if self.fetched is not None or self.host is None:  # fetched already, or taken (an earlier step's)
            return
        stream = _side_stream(self.device)
        with torch.cuda.stream(stream):
            self.fetched = [h.to(self.device, non_blocking=True) for h in self.host]
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self) -> list[Any]:
        """The device tensors, usable on the current stream; prefetches the layer before this one."""
        import torch

        if not self.cuda:
            return self.fetched
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        for t in self.fetched:
            t.record_stream(current)  # allocated on the side stream, freed after use on this one
        earlier = self.previous() if self.previous is not None else None
        if earlier is not None:
            earlier.prefetch()
        tensors, self.fetched, self.host = self.fetched, None, None
        return tensors


def _function() -> type:
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, run: Callable[..., Any], shape: dict, hidden: Any, *rest: Any) -> Any:
            ctx.run = run
            rest, ctx.params, ctx.layer = rest[:shape["args"]], rest[shape["args"]:], shape["layer"]  # see below
            ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None)
            with torch.no_grad(), taping(Tape(RECORD)) as tape:
                out = run(hidden, *rest)
            ctx.saved = _Saved([hidden, *tape.sums], hidden.device)
            ctx.tuple_out = shape["tuple"] = isinstance(out, tuple)
            shape["tail"] = out[1:] if ctx.tuple_out else ()
            ctx.save_for_backward(*[r if torch.is_tensor(r) else None for r in rest])
            ctx.rest = [None if torch.is_tensor(r) else r for r in rest]
            return out[0] if ctx.tuple_out else out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            hidden, *sums = ctx.saved.take()
            hidden = hidden.detach().requires_grad_(True)
            rest = [t if t is not None else r for t, r in zip(ctx.saved_tensors, ctx.rest)]
            cpu_rng, cuda_rng = ctx.rng
            devices = [hidden.device] if cuda_rng is not None else []
            with torch.random.fork_rng(devices=devices), taping(Tape(REPLAY, sums)):
                torch.set_rng_state(cpu_rng)  # dropout in the recomputation draws what the forward drew
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, hidden.device)
                with torch.enable_grad():
                    out = ctx.run(hidden, *rest)
            out = out[0] if ctx.tuple_out else out
            # The parameters' gradients go out through their edges, unless the layer now holds other parameter
            # objects than in the forward (a sharding wrapper's views): then they accumulate in place, as before.
            params = list(ctx.params) if _same(ctx.params, _trainable(ctx.layer)) else []
            if params:
                grads = torch.autograd.grad(out, [hidden, *params], grad, allow_unused=True)
            else:
                torch.autograd.backward(out, grad)
                grads = (hidden.grad, *[None] * len(ctx.params))
            return (None, None, grads[0], *[None] * len(rest), *grads[1:])

    return OffloadedCheckpoint


_FUNCTION: list[type] = []


def _layer_of(function: Callable[..., Any]) -> Any:
    """The module a transformers layer checkpoints: `partial(forward, layer)` (5.x) or `partial(layer.__call__)`."""
    import torch

    candidates = [*getattr(function, "args", ())[:1], getattr(getattr(function, "func", function), "__self__", None)]
    return next((c for c in candidates if isinstance(c, torch.nn.Module)), None)


def _trainable(layer: Any) -> list[Any]:
    # FSDP2 swaps a unit's parameters between forward and backward, and its hooks need the gradients accumulated
    # in place: its layers get no edges.
    fsdp = layer is None or any(k.__name__ == "FSDPModule" for k in type(layer).__mro__)
    return [] if fsdp else [p for p in layer.parameters() if p.requires_grad]


def _same(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def offloaded_checkpoint(function: Callable[..., Any], hidden: Any, *args: Any, **kwargs: Any) -> Any:
    """Drop-in for `torch.utils.checkpoint.checkpoint(function, hidden, *args)` with CPU-offloaded inputs."""
    if not _FUNCTION:
        _FUNCTION.append(_function())
    if kwargs:
        import functools

        kwargs.pop("use_reentrant", None)
        function = functools.partial(function, **kwargs) if kwargs else function
    layer = _layer_of(function)
    # and whether the layer returns a tuple (transformers 4) or a tensor (5)
    shape: dict = {"args": len(args), "layer": layer}
    # The layer's trainable parameters are inputs too, and get their gradients from the backward: DDP with
    # find_unused_parameters=True (the Trainer's default for a PeftModel) walks the graph from the loss, and would
    # find parameters used only inside this forward unused, then see their gradients arrive ("Expected to mark a
    # variable ready only once").
    out = _FUNCTION[0].apply(function, shape, hidden, *args, *_trainable(layer))
    return (out, *shape["tail"]) if shape["tuple"] else out


def enable_offloaded_checkpointing(model: Any, every_n_layers: int = 1) -> int:
    """Checkpoint the decoder layers of `model` with CPU offload; returns how many layers.

    `every_n_layers=n` checkpoints layers 0, n, 2n...: the others keep their activations on the GPU, which
    trades memory back for speed where memory is left over (each layer spared skips its replay).
    Uses transformers' own checkpointing switch and replaces, per instance, the function each layer calls.
    The layers' inputs must require grad for the backward to reach the first layer: the embeddings' output is
    made to (the same step `enable_input_require_grads` does for any checkpointed PEFT model).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f"every_n_layers must be a whole number >= 1, not {every_n_layers!r}")
    while isinstance(model, DistributedDataParallel):  # enabled after the wrapping: the model it holds
        model = model.module
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    index = layers = 0
    for module in model.modules():
        # The layers transformers checkpoints one by one (the model object carries the flag too)
        is_layer = any(k.__name__ == "GradientCheckpointingLayer" for k in type(module).__mro__)
        if not (is_layer and getattr(module, "gradient_checkpointing", False)):
            continue
        if index % every_n_layers == 0:
            module._gradient_checkpointing_func = offloaded_checkpoint
            layers += 1
        else:
            module.gradient_checkpointing = False
        index += 1
    return layers
