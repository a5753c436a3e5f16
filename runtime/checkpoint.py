"""Layer checkpointing whose saved inputs wait in pinned CPU memory, for long contexts.

Plain checkpointing keeps every decoder layer's input on the GPU: at 128K tokens that is 1 GiB a layer on
an 8B model. Here the forward runs without keeping activations, copies the layer's input to pinned host
memory on a side stream (overlapping the next layer's work), and the backward brings it back, recomputes the
layer with grad, and backpropagates through it. GPU memory then holds the weights and one layer's working set.
"""
from __future__ import annotations

from typing import Any, Callable


def _offload(tensor: Any) -> tuple[Any, Any]:
    import torch

    if not tensor.is_cuda:
        return tensor.detach(), None  # on CPU there is nothing to move: keep it as it is
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    stream = _side_stream(tensor.device)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(stream):
        host.copy_(tensor.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    tensor.record_stream(stream)  # the caching allocator must not reuse it before the copy ends
    return host, done


_STREAMS: dict[Any, Any] = {}


def _side_stream(device: Any) -> Any:
    import torch

    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _function() -> type:
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, run: Callable[..., Any], shape: dict, hidden: Any, *rest: Any) -> Any:
            ctx.run, ctx.device = run, hidden.device
            ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None)
            with torch.no_grad():
                out = run(hidden, *rest)
            ctx.host, ctx.copied = _offload(hidden)
            ctx.tuple_out = shape["tuple"] = isinstance(out, tuple)
            shape["tail"] = out[1:] if ctx.tuple_out else ()
            ctx.save_for_backward(*[r if torch.is_tensor(r) else None for r in rest])
            ctx.rest = [None if torch.is_tensor(r) else r for r in rest]
            return out[0] if ctx.tuple_out else out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            if ctx.copied is not None:
                ctx.copied.synchronize()
            hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
            rest = [t if t is not None else r for t, r in zip(ctx.saved_tensors, ctx.rest)]
            cpu_rng, cuda_rng = ctx.rng
            with torch.random.fork_rng(devices=[ctx.device] if cuda_rng is not None else []):
                torch.set_rng_state(cpu_rng)  # dropout in the recomputation draws what the forward drew
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, ctx.device)
                with torch.enable_grad():
                    out = ctx.run(hidden, *rest)
            out = out[0] if ctx.tuple_out else out
            torch.autograd.backward(out, grad)
            return (None, None, hidden.grad, *[None] * len(rest))

    return OffloadedCheckpoint


_FUNCTION: list[type] = []


def offloaded_checkpoint(function: Callable[..., Any], hidden: Any, *args: Any, **kwargs: Any) -> Any:
    """Drop-in for `torch.utils.checkpoint.checkpoint(function, hidden, *args)` with CPU-offloaded inputs."""
    if not _FUNCTION:
        _FUNCTION.append(_function())
    if kwargs:
        import functools

        kwargs.pop("use_reentrant", None)
        function = functools.partial(function, **kwargs) if kwargs else function
    shape: dict = {}  # whether the layer returns a tuple (transformers 4) or a tensor (5)
    out = _FUNCTION[0].apply(function, shape, hidden, *args)
    return (out, *shape["tail"]) if shape["tuple"] else out


def enable_offloaded_checkpointing(model: Any) -> int:
    """Checkpoint every decoder layer of `model` with CPU offload; returns how many layers.

    Uses transformers' own checkpointing switch and replaces, per instance, the function each layer calls.
    The layers' inputs must require grad for the backward to reach the first layer: the embeddings' output is
    made to (the same step `enable_input_require_grads` does for any checkpointed PEFT model).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    layers = 0
    for module in model.modules():
        # The layers transformers checkpoints one by one (the model object carries the flag too)
        is_layer = any(k.__name__ == "GradientCheckpointingLayer" for k in type(module).__mro__)
        if is_layer and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = offloaded_checkpoint
            layers += 1
    return layers
