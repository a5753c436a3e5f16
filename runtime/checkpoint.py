"""Layer checkpointing whose saved tensors wait in pinned CPU memory, for long contexts and tight budgets.

Plain checkpointing keeps every decoder layer's input on the GPU: at 128K tokens that is 1 GiB a layer on
an 8B model. Here the forward runs without keeping activations and copies what the backward will need (the
layer's input and, for our patched layers, its inner residual sum, see `replay.py`, and its attention's q, k, v,
output and log-sum-exp, see `saved_attention.py`) to pinned host memory on a side stream, overlapping the next
layer's work. The backward of layer i starts copying layer i-1's tensors back
on that stream before it recomputes its own layer, so that the transfers overlap the compute. GPU memory then
holds the weights, one layer's working set and two layers' saved tensors.

Host memory is planned too: every layer's saved tensors sit in pinned memory from its forward to its backward,
so at 256K tokens an 8B model would pin 4 GiB a layer, 128 GiB in all, more than many hosts have. A
`HostBudget` (by default 90% of the memory the host has available when checkpointing is enabled) is charged
for each layer's copies. The inputs of all the step's layers come first: a layer keeps its inner sum too only
where the inputs of the layers after it still fit beside it, and its attention's tensors only where their sums
do too. A layer that
keeps no attention tensors runs its attention again in the replay; one that keeps only its input replays its
output projections too; a layer whose input does not fit on the host keeps it on the GPU, which costs GPU
memory as well, so the plan leaves that for last. `host_plan(model)` says what each step did.

On the GPU, the saved tensors' blocks serve the next layers as soon as the streams are ordered: a layer's
forward lets go of the tensors of the layer two before it once the current stream waits for their copies, and
the backward's copies back land in blocks of the current stream, which waits for them before use. (Freed with
`record_stream` instead, a block waits until the host sees its copy end, and a host running ahead of the GPU,
as with CUDA graphs, would take fresh blocks for every layer: measured at 8B QLoRA, 3 GiB reserved and unused.)
The step's last layer hands itself and the layer before it over with `record_stream` all the same, as does a layer
of more than `_HOLD_BYTES` (long contexts): when a request fails, the allocator synchronizes and frees such blocks,
which it cannot do for held ones.

The pinned allocator rounds every block up to a power of two, so a 3.1 GiB tensor would pin 4 GiB. Each
tensor is copied in power-of-two pieces instead (its binary expansion, down to 1/64 of its size), which wastes
under 2%. The budget counts what is held at once; the allocator also caches freed blocks for reuse by a
request of the same size, so a run whose lengths vary widely pins one set of blocks per length (rows packed to
one token budget share one).
"""
from __future__ import annotations

import collections
import functools
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from .autocast import autocast_state, restored
from .eligibility import still_held
from .graphs import GraphSet, GraphStats, LayerGraphs
from .parameters import trainable_parameters
from .tape import RECOMPUTE, RECORD, REPLAY, Layout, Tape, taping

_STREAMS: dict[Any, Any] = {}
_LAST: dict[Any, Any] = {}  # device -> weak reference to the most recent layer's _Saved
_UNSETTLED: dict[Any, Any] = {}  # device -> deque of weak references to layers still holding their sources
_IN_FLIGHT = 2  # layers whose copies to the host may still run when a layer's forward ends
_HOLD_BYTES = 512 << 20  # a layer's saved bytes up to which its forward holds them until settled (see settle)


def _side_stream(device: Any) -> Any:
    import torch

    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


@dataclass
class HostBudget:
    """Pinned host bytes the saved tensors of one model may hold at once, and what the plan did with them."""

    limit: int | None  # None: no limit
    layers: int = 0  # checkpointed layers per forward, whose inputs the plan reserves room for; 0: unknown
    held: int = 0
    peak: int = 0
    pending: int = 0  # layers between their forward and their backward, wherever their tensors are
    layers_offloaded: int = 0  # layer forwards whose tensors all went to the host, since enabling
    layers_without_attention: int = 0  # ... that kept the input and inner sum, not the attention's tensors
    layers_input_only: int = 0  # ... that kept the input alone on the host, and replayed in full
    layers_on_device: int = 0  # ... whose input did not fit either: kept on the GPU
    graphs: GraphStats | None = None  # the layers' CUDA graphs, where enabled (graphs.py)

    def place(self, tensors: list[Any], without_attention: int) -> tuple[int, int | None]:
        """For one layer's saved tensors (its input, its inner sums, then its attention's): how many it keeps
        (all, the first `without_attention`, or the input), and the pinned bytes charged for them, or None where
        they stay on the GPU. Call `leave` once at the layer's backward."""
        self.pending += 1
        sizes = [_pinned_bytes(t) for t in tensors]
        later = max(0, self.layers - self.pending)  # the step's layers still to come, each with an input
        # Later layers' inputs come first, then their sums (each saves a whole replay), then attention tensors.
        room = ((len(tensors), sum(sizes) + later * sum(sizes[:without_attention])),
                (without_attention, sum(sizes[:without_attention]) + later * sizes[0]), (1, sizes[0]))
        keep = next((n for n, size in room if self._fits(size)), 0)
        if not keep:
            self.layers_on_device += 1
            return 1, None
        self.held += sum(sizes[:keep])
        self.peak = max(self.peak, self.held)
        self.layers_offloaded += keep == len(tensors)
        self.layers_without_attention += keep == without_attention < len(tensors)
        self.layers_input_only += keep < min(len(tensors), without_attention)
        return keep, sum(sizes[:keep])

    def _fits(self, size: int) -> bool:
        return self.limit is None or self.held + size <= self.limit

    def leave(self, size: int) -> None:
        self.held -= size
        self.pending -= 1


_SMALLEST_SHARE = 64  # pieces go down to 1/64 of the tensor (or 1 MiB), the last one rounded up


def _pieces(nbytes: int) -> list[int]:
    """Power-of-two block sizes that hold `nbytes`: the binary expansion from the top, the rest in one block."""
    floor = max(1 << 20, (1 << max(0, nbytes - 1).bit_length()) // _SMALLEST_SHARE)
    pieces, rest = [], nbytes
    while rest > floor:
        top = 1 << (rest.bit_length() - 1)
        pieces.append(top)
        rest -= top
    if rest:
        pieces.append(1 << (rest - 1).bit_length())
    return pieces


def _pinned_bytes(t: Any) -> int:
    return sum(_pieces(t.numel() * t.element_size()))


def _to_host(t: Any, stream: Any) -> list[tuple[Any, int]]:
    """Copies of the contiguous `t`'s bytes into pinned pieces on `stream`: [(piece, bytes used)]. The caller
    keeps `t` until the copies are ordered before its blocks' next use (`_Saved.settle`, `_after_copies`)."""
    import torch

    flat = t.view(-1).view(torch.uint8)
    out, start = [], 0
    with torch.cuda.stream(stream):
        for size in _pieces(flat.numel()):
            used = min(size, flat.numel() - start)
            piece = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            piece[:used].copy_(flat[start:start + used], non_blocking=True)
            out.append((piece, used))
            start += used
    return out


def _to_device(pieces: list[tuple[Any, int]], t: Any) -> None:
    """Copies of the pinned pieces into the device tensor `t`, on the current stream."""
    import torch

    flat, start = t.view(-1).view(torch.uint8), 0
    for piece, used in pieces:
        flat[start:start + used].copy_(piece[:used], non_blocking=True)
        start += used


def _after_copies(tensors: list[Any], device: Any) -> None:
    """Hand device tensors to the allocator: their blocks serve again once the side stream's work so far ends."""
    for t in tensors:
        t.record_stream(_side_stream(device))


def available_host_memory() -> int | None:
    """Bytes the host can still give this process: MemAvailable on Linux (free pages elsewhere), or less where
    a cgroup (a container's memory limit) allows less; None when unknown."""
    found = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    # cgroup v2, then v1: the limit less what the group uses now. /proc/meminfo shows the whole host's memory.
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number: no limit
            return max(0, int(limit) - usage)
    return None


class _Saved:
    """One layer's saved tensors between its forward and backward: host copies, then device copies."""

    def __init__(self, tensors: list[Any], device: Any, budget: HostBudget | None = None,
                 without_attention: int | None = None, last: bool = False):
        import torch

        self.device, self.cuda, self.charged, self.budget = device, device.type == "cuda", 0, budget
        if budget is not None:
            keep, charged = budget.place(tensors, len(tensors) if without_attention is None else without_attention)
            tensors = tensors[:keep]
            if charged is None:
                self.cuda = False  # kept where it is, as on the CPU
            self.charged = charged or 0
        if not self.cuda:  # on the CPU (or over the host budget) nothing moves
            self.host, self.fetched = None, [t.detach() for t in tensors]
            if last:
                _let_go_all()
            return
        tensors = [t.detach().contiguous() for t in tensors]  # a strided one's copy, before the side stream waits
        stream = _side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        self.layout = [(t.shape, t.dtype) for t in tensors]
        # The device tensors, until the stream that made them is ordered after their copies (settle). A large
        # layer's go to the allocator at once instead: when a request fails, it synchronizes and frees blocks
        # handed over so, which it cannot do for held ones; at long contexts two held layers could exhaust it.
        self.sources: list[Any] | None = tensors
        self.stream = torch.cuda.current_stream(device)
        self.host = [_to_host(t, stream) for t in tensors]
        self.copied = torch.cuda.Event()
        self.copied.record(stream)
        self.fetched, self.ready = None, None
        self.previous = _LAST.get(device)  # a weak reference: a finished step's layers must not stay alive
        _LAST[device] = weakref.ref(self)
        unsettled = _UNSETTLED.setdefault(device, collections.deque())
        if sum(t.numel() * t.element_size() for t in tensors) > _HOLD_BYTES:
            self.let_go()
        else:
            unsettled.append(weakref.ref(self))
        while len(unsettled) > _IN_FLIGHT:
            earlier = unsettled.popleft()()
            if earlier is not None:
                earlier.settle()
        if last:  # the step's last checkpointed layer: no later one will settle these
            _let_go_all()

    def settle(self) -> None:
        """Order the stream that made the device tensors after their copies out, and let them go: the allocator
        may give their blocks to that stream's next requests at once. (Handed over with `record_stream`, a block
        waits until the host sees the copies end; a host that runs ahead of the GPU, as with CUDA graphs, sees
        that late and meanwhile takes fresh blocks for every layer.) A layer settles the one `_IN_FLIGHT` before
        it, so the forward waits only where the copies fall that far behind."""
        if self.sources is not None:
            self.stream.wait_event(self.copied)  # the stream whose pool their blocks return to
            self.sources = None

    def let_go(self) -> None:
        """Let the device tensors go without ordering the current stream: their blocks wait for the copies."""
        if self.sources is not None:
            _after_copies(self.sources, self.device)
            self.sources = None

    def prefetch(self, first: bool = False) -> None:
        """Start the copy back to the GPU on the side stream (queued after the copy out), once. `first`: the
        backward's first layer, which no later layer prefetched."""
        import torch

        if self.fetched is not None or self.host is None:  # fetched already, or taken (an earlier step's)
            return
        stream, current = _side_stream(self.device), torch.cuda.current_stream(self.device)
        # The first on the side stream's own blocks (one layer's, reused every step), so that its copy starts as
        # the copy out ends, during the loss, not once the current stream gets here: the backward would wait. The
        # others on the current stream's, which then serve the forward's saved tensors and the backward's alike
        # and are freed in its order, since it waits for the copies before any use (take).
        with torch.cuda.stream(stream if first else current):
            fetched = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.layout]
        if first:
            for t in fetched:
                t.record_stream(current)  # freed after use on the current stream
        else:
            stream.wait_stream(current)  # their blocks may be ones the current stream's queued work still uses
        with torch.cuda.stream(stream):
            for pieces, t in zip(self.host, fetched):
                _to_device(pieces, t)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        self.fetched, self.fetched_on = fetched, current

    def take(self) -> list[Any]:
        """The device tensors, usable on the current stream; prefetches the layer before this one."""
        import torch

        if not self.cuda:  # nothing moved: the same tensors for every backward (retain_graph), the share back
            self._release()
            return self.fetched
        if self.host is None and self.fetched is None:
            raise RuntimeError(
                "a second backward through a layer under enable_offloaded_checkpointing: its saved tensors were "
                "freed by the first (retain_graph=True is not supported there; run the forward again instead)")
        self.settle()
        self.prefetch(first=True)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        if current != self.fetched_on:  # prefetched for another stream than the one that uses them
            for t in self.fetched:
                t.record_stream(current)
        earlier = self.previous() if self.previous is not None else None
        if earlier is not None:
            earlier.prefetch()
        tensors, self.fetched, self.host = self.fetched, None, None
        self._release()
        return tensors

    def _release(self) -> None:
        if self.budget is not None:
            self.budget.leave(self.charged)
        self.budget = None  # once per layer, whichever of take() and __del__ comes first

    def __del__(self) -> None:  # a step abandoned before its backward
        try:  # CUDA calls in a finalizer: at interpreter exit torch may be gone already
            if getattr(self, "sources", None) is not None:
                self.let_go()
            if getattr(self, "cuda", False) and getattr(self, "fetched", None) is not None:  # prefetched, not taken
                _after_copies(self.fetched, self.device)
        except Exception:  # noqa: BLE001, S110 - nothing left to order
            pass
        self._release()


def _let_go_all() -> None:
    """Let go of every layer still holding its device tensors, on every device (the step's last layer has run;
    a model split across GPUs leaves the earlier GPUs' last layers unsettled)."""
    for unsettled in list(_UNSETTLED.values()):  # a copy: DataParallel runs replicas in threads
        while unsettled:
            saved = unsettled.popleft()()
            if saved is not None:
                saved.let_go()


def _function() -> type:
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, run: Callable[..., Any], shape: dict, hidden: Any, *rest: Any) -> Any:
            ctx.run = run
            rest, ctx.params, ctx.layer = rest[:shape["args"]], rest[shape["args"]:], shape["layer"]  # see below
            ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None)
            ctx.autocast = autocast_state(hidden.device.type)
            graphs = shape["graphs"]
            ctx.graphs = graphs = graphs if graphs is not None and graphs.set.supports(hidden) else None
            if graphs is None:
                out, kept, layout = _record(run, hidden, rest)
            else:
                out, kept, layout = graphs.forward(_record, run, hidden, rest)
            ctx.graph_clean = graphs is not None and graphs.forward_call.clean
            ctx.saved = _Saved([hidden, *kept], hidden.device, shape["budget"], without_attention=1 + layout.sums,
                               last=shape["last"])
            ctx.layout = layout  # the projections' paths, for the replay to take the same, and what was kept
            ctx.tuple_out = shape["tuple"] = isinstance(out, tuple)
            shape["tail"] = out[1:] if ctx.tuple_out else ()
            ctx.save_for_backward(*[r if torch.is_tensor(r) else None for r in rest])
            ctx.rest = [None if torch.is_tensor(r) else r for r in rest]
            return out[0] if ctx.tuple_out else out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            hidden, *kept = ctx.saved.take()
            hidden = hidden.detach().requires_grad_(True)
            # What the budget let the layer keep: with its inner sums, a replay without the output projections
            # (and without the attention where its tensors were kept too); with its input alone, the whole layer.
            layout = ctx.layout._replace(parts=_held(ctx.layout.parts))
            mode = REPLAY if len(kept) >= layout.sums else RECOMPUTE
            rest = [t if t is not None else r for t, r in zip(ctx.saved_tensors, ctx.rest)]
            params = list(ctx.params) if _same(ctx.params, trainable_parameters(ctx.layer)) else []
            graphs = ctx.graphs
            # A graph restores neither random state nor autocast: it stands in for a forward that drew no random
            # numbers and ran without autocast, in a backward without autocast too (as the forward ran).
            if ctx.graph_clean and params and not ctx.autocast.on_device \
                    and not autocast_state(hidden.device.type).on_device:
                grads = graphs.backward(ctx.run, hidden, kept, rest, grad, params, layout, mode)
                return (None, None, grads[0], *[None] * len(rest), *grads[1:])
            cpu_rng, cuda_rng = ctx.rng
            devices = [hidden.device] if cuda_rng is not None else []
            replay = Tape.replaying(kept, layout) if mode == REPLAY else Tape(RECOMPUTE)
            replay.parts = layout.parts
            with torch.random.fork_rng(devices=devices), taping(replay), restored(ctx.autocast):
                torch.set_rng_state(cpu_rng)  # dropout in the recomputation draws what the forward drew
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, hidden.device)
                with torch.enable_grad():
                    out = ctx.run(hidden, *rest)
            out = out[0] if ctx.tuple_out else out
            # The parameters' gradients go out through their edges, unless the layer now holds other parameter
            # objects than in the forward (a sharding wrapper's views): then they accumulate in place, as before.
            if params:
                grads = torch.autograd.grad(out, [hidden, *params], grad, allow_unused=True)
            else:
                torch.autograd.backward(out, grad)
                grads = (hidden.grad, *[None] * len(ctx.params))
            return (None, None, grads[0], *[None] * len(rest), *grads[1:])

    return OffloadedCheckpoint


_FUNCTION: list[type] = []


def _record(run: Callable[..., Any], hidden: Any, rest: Any) -> tuple[Any, list[Any], Layout]:
    """The forward without grad: (output, the tensors kept for the replay, their layout and the projections'
    parts), taped."""
    import torch

    with torch.no_grad(), taping(Tape(RECORD)) as tape:
        out = run(hidden, *rest)
    return out, tape.kept(), tape.layout()


def _layer_of(function: Callable[..., Any]) -> Any:
    """The module a transformers layer checkpoints: `partial(forward, layer)` (5.x) or `partial(layer.__call__)`."""
    import torch

    candidates = [*getattr(function, "args", ())[:1], getattr(getattr(function, "func", function), "__self__", None)]
    return next((c for c in candidates if isinstance(c, torch.nn.Module)), None)


def _held(parts: dict) -> dict:
    """The recorded projection parts whose LoRA tensors their modules still hold: the others are read again in
    the replay, so that the gradients reach the parameters the layer holds now."""
    return {k: (m, p) for k, (m, p) in parts.items() if p is None or still_held(m, p)}


def _same(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def offloaded_checkpoint(function: Callable[..., Any], hidden: Any, *args: Any, host_budget: HostBudget | None = None,
                         graphs: LayerGraphs | None = None, last_layer: bool = False, **kwargs: Any) -> Any:
    """Drop-in for `torch.utils.checkpoint.checkpoint(function, hidden, *args)` with CPU-offloaded inputs,
    within `host_budget` when given, the layer's calls replayed as CUDA graphs by `graphs` when given.
    `last_layer`: the last layer a forward checkpoints (its saved tensors let the earlier layers' go)."""
    if not _FUNCTION:
        _FUNCTION.append(_function())
    if kwargs:
        kwargs.pop("use_reentrant", None)
        function = functools.partial(function, **kwargs) if kwargs else function
    layer = _layer_of(function)
    # and whether the layer returns a tuple (transformers 4) or a tensor (5)
    shape: dict = {"args": len(args), "layer": layer, "budget": host_budget, "last": last_layer,
                   "graphs": graphs if graphs is not None and graphs.layer is layer else None}
    # The layer's trainable parameters are inputs too, and get their gradients from the backward: DDP with
    # find_unused_parameters=True (the Trainer's default for a PeftModel) walks the graph from the loss, and would
    # find parameters used only inside this forward unused, then see their gradients arrive ("Expected to mark a
    # variable ready only once").
    out = _FUNCTION[0].apply(function, shape, hidden, *args, *trainable_parameters(layer))
    return (out, *shape["tail"]) if shape["tuple"] else out


_BUDGET = "_adapter_doctor_host_budget"


def enable_offloaded_checkpointing(model: Any, every_n_layers: int = 1, host_memory_gib: float | None = None,
                                   cuda_graphs: bool = False) -> int:
    """Checkpoint the decoder layers of `model` with CPU offload; returns how many layers.

    `every_n_layers=n` checkpoints layers 0, n, 2n...: the others keep their activations on the GPU, which
    trades memory back for speed where memory is left over (each layer spared skips its replay).
    `host_memory_gib` caps the pinned host memory the saved tensors take at once; by default 90% of what the
    host has available now, shared among the processes of this host (LOCAL_WORLD_SIZE) when launched by
    torchrun. See the module's docstring for what happens to the layers that do not fit.
    `cuda_graphs=True` replays each checkpointed layer's forward and backward on CUDA as graphs where they allow
    it (`graphs.py`: no dropout, no autocast, no hooks, no packed batch, a batch shape that repeats), which takes
    the host's launching out of the step, for the same results as the eager calls. It pays where the host is
    slower than the GPU (small batches, a slow or busy host), and costs GPU memory that the allocator reserves
    but does not count as allocated (the graphs' pool and their copies of each call's inputs and outputs):
    measured on H200s at 8B QLoRA, 3 to 32% more tok/s at batch 2, as the host's speed varied, for about 1.3 GiB
    more reserved (9.1 against 7.8 GiB), nothing at batch 4 (README). `host_plan(model).graphs` counts what
    they did.
    Uses transformers' own checkpointing switch and replaces, per instance, the function each layer calls.
    The layers' inputs must require grad for the backward to reach the first layer: the embeddings' output is
    made to (the same step `enable_input_require_grads` does for any checkpointed PEFT model).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f"every_n_layers must be a whole number >= 1, not {every_n_layers!r}")
    if host_memory_gib is not None and not host_memory_gib > 0:
        raise ValueError(f"host_memory_gib must be a positive number of GiB, not {host_memory_gib!r}")
    if host_memory_gib is None:
        available = available_host_memory()
        local = os.environ.get("LOCAL_WORLD_SIZE", "")
        share = max(1, int(local)) if local.isdigit() else 1
        limit = None if available is None else int(available * 0.9) // share
    else:
        limit = int(host_memory_gib * 2**30)
    while isinstance(model, DistributedDataParallel):  # enabled after the wrapping: the model it holds
        model = model.module
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    graphs = GraphSet() if cuda_graphs else None
    budget = model.__dict__[_BUDGET] = HostBudget(limit, graphs=None if graphs is None else graphs.stats)
    candidates = [m for m in model.modules() if _checkpointed_layer(m)]
    chosen = candidates[::every_n_layers]
    for index, module in enumerate(candidates):
        if index % every_n_layers:
            module.gradient_checkpointing = False
            continue
        layer_graphs = None if graphs is None else LayerGraphs(graphs, module)
        module._gradient_checkpointing_func = functools.partial(
            offloaded_checkpoint, host_budget=budget, graphs=layer_graphs, last_layer=module is chosen[-1])
    budget.layers = len(chosen)
    return len(chosen)


def _checkpointed_layer(module: Any) -> bool:
    # The layers transformers checkpoints one by one (the model object carries the flag too)
    return bool(getattr(module, "gradient_checkpointing", False)) and \
        any(k.__name__ == "GradientCheckpointingLayer" for k in type(module).__mro__)


def replaced_layers(model: Any) -> list[str]:
    """Names of the checkpointed layers that run another checkpoint than ours, in a model (or a model holding
    one) that `enable_offloaded_checkpointing` set up: a later `gradient_checkpointing_enable` put torch's back."""
    if not any(_BUDGET in vars(m) for m in model.modules()):
        return []
    return [name for name, m in model.named_modules() if _checkpointed_layer(m)
            and getattr(getattr(m, "_gradient_checkpointing_func", None), "func", None) is not offloaded_checkpoint]


def host_plan(model: Any) -> HostBudget | None:
    """The host budget `enable_offloaded_checkpointing` set on `model` and what it did, or None."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model.__dict__.get(_BUDGET)
