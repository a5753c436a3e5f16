"""CUDA graphs of the two calls an offloaded checkpoint makes of a decoder layer: its forward without grad, and
in the backward its replay with the gradients.

Each call is hundreds of small launches (on a 4-bit base every projection dequantizes, multiplies and adds),
and at small batches the host takes longer to launch them than the GPU to run them: the GPU waits. A CUDA graph
replays a recorded call's kernels in one launch. Per layer, a call is captured the second time it is seen with
the same signature (the first runs as it is, which compiles kernels and creates library handles outside the
capture) and replayed while its signature holds.

The signature is what a recorded call baked in:
- every tensor argument's shape, strides, dtype and device (the values are copied into the graph's input
  buffers at each replay), and the value of every other argument;
- the address and layout of each of the layer's parameters and buffers (and, for the backward, which of them
  require grad), and each LoRA projection's parts as `eligibility.lora_parts` reads them now: switching,
  disabling, merging or rescaling an adapter, or rebinding a parameter, changes them;
- training mode.
A call whose signature changed runs eagerly and is captured again at its next sighting. Some calls are never
captured: under autocast (whose cache of weight casts a replay would read after the region freed it), with
module hooks (a replay would skip them), a packed batch (its attention builds the document layout per batch),
a layer across devices, one whose LoRA layers run as PEFT modules (their result follows PEFT's state, which no
signature here reads). A layer whose forward draws random numbers (dropout) or returns more than one tensor, or
whose warm-up or capture fails, runs eagerly for good; after a failed capture the whole model does, since it
can leave CUDA's allocator in capture mode. A backward is replayed only after a forward that drew no random
numbers and ran without autocast, and only outside autocast itself: the eager backward restores the forward's
random state and autocast settings for its replay, a graph cannot (checkpoint.py decides). `GraphStats` counts
each eager call's reason.

The graphs of one model share one memory pool per device, and their inputs and outputs sit in buffers shared
by the layers of one signature: like the eager run, they hold one layer's working set, not one per layer. The
outputs are copied out of those buffers after each replay, since the next layer's replay rewrites them. Buffers
are kept for every layout seen, so batches of ever new shapes (dynamic padding) grow memory and recapture: pad
to a few fixed lengths, or leave the graphs off.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from .eligibility import global_hooks, hooked, is_lora_linear, lora_parts
from .tape import REPLAY, Layout, Tape, taping

_PLAIN = (type(None), bool, int, float, str)


class Ungraphable(Exception):
    """A call the graphs cannot stand in for; the message says why."""


@dataclass
class GraphStats:
    """What the layers' graphs did since checkpointing was enabled: calls captured and replayed, and calls run
    eagerly, by reason (a first sighting and a changed signature included)."""

    captured: int = 0
    replayed: int = 0
    eager: dict[str, int] = field(default_factory=dict)

    def ran_eagerly(self, reason: str) -> None:
        self.eager[reason] = self.eager.get(reason, 0) + 1


def _flatten(value: Any, leaves: list[Any]) -> Any:
    """A hashable description of `value`'s nesting of tuples, lists and dicts; its leaves appended in order."""
    kind = type(value)
    if kind in (tuple, list):
        return kind, tuple(_flatten(v, leaves) for v in value)
    if kind is dict:
        return dict, tuple((k, _flatten(v, leaves)) for k, v in value.items())
    leaves.append(value)
    return None


def _unflatten(spec: Any, leaves: Any) -> Any:
    if spec is None:
        return next(leaves)
    kind, children = spec
    if kind is dict:
        return {k: _unflatten(s, leaves) for k, s in children}
    return kind(_unflatten(s, leaves) for s in children)


def tensor_key(t: Any) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype, t.device


def _leaf_key(leaf: Any) -> Any:
    import torch

    if torch.is_tensor(leaf):
        return tensor_key(leaf)
    if isinstance(leaf, _PLAIN) or isinstance(leaf, (torch.dtype, torch.device)):
        return type(leaf), leaf
    if isinstance(leaf, torch.nn.Module) or callable(leaf):
        return _callable_key(leaf)
    raise Ungraphable(f"an argument of type {type(leaf).__name__}")


def _callable_key(f: Any) -> tuple:
    # A bound method is a new object at every attribute access: its function and instance identify it.
    inner, owner = getattr(f, "__func__", None), getattr(f, "__self__", None)
    return ("bound", id(inner), id(owner)) if inner is not None else ("object", id(f))


class Call:
    """A layer call (`function(hidden, *rest)`, `function` often a partial holding tensors) split into its
    signature and its tensors, and rebuilt around other tensors of the same layouts."""

    def __init__(self, function: Callable[..., Any], rest: Sequence[Any]):
        import torch

        if isinstance(function, functools.partial):
            self.func, args, keywords = function.func, function.args, function.keywords
        else:
            self.func, args, keywords = function, (), {}
        self.leaves: list[Any] = []
        self.spec = _flatten((tuple(args), dict(keywords), tuple(rest)), self.leaves)
        self.tensors = [t for t in self.leaves if torch.is_tensor(t)]
        if any(k.startswith("cu_seq_lens") for k in keywords):  # its attention builds the layout per batch
            raise Ungraphable("a packed batch")
        self.key = (_callable_key(self.func), self.spec, tuple(_leaf_key(v) for v in self.leaves))

    def rebuilt(self, tensors: Sequence[Any]) -> tuple[Callable[..., Any], tuple]:
        """(function, rest) with this call's tensors replaced, in order, by `tensors`."""
        import torch

        given = iter(tensors)
        leaves = iter([next(given) if torch.is_tensor(v) else v for v in self.leaves])
        args, keywords, rest = _unflatten(self.spec, leaves)
        return functools.partial(self.func, *args, **keywords), rest


def _parts_key(parts: Any) -> Any:
    import torch

    if parts is None:
        return None
    return tuple(tensor_key(v) + (v.data_ptr(),) if torch.is_tensor(v) else
                 _parts_key(v) if isinstance(v, tuple) else v for v in parts)


def parts_key(recorded: dict) -> tuple:
    """The signature of a tape's recorded projection parts ({id: (module, parts)}); raises Ungraphable where a
    LoRA layer ran as a PEFT module, whose result follows PEFT's state, which no signature here reads."""
    found = []
    for module, parts in recorded.values():
        if parts is None and is_lora_linear(module):
            raise Ungraphable("a LoRA projection runs as a PEFT module")
        found.append((id(module), _parts_key(parts)))
    return tuple(found)


def current_parts(recorded: dict) -> dict:
    """The parts the recorded modules give now (as the next forward would record them)."""
    return {k: (module, lora_parts(module)) for k, (module, _) in recorded.items()}


def layer_key(layer: Any, grads: bool, device: Any) -> tuple:
    """The layer's tensors as a recorded call reads them (address and layout) and its mode; raises Ungraphable
    for what a graph cannot replay: a layer across devices, hooks (the replay would skip them), autocast (its
    cache of weight casts, filled by the warm-up, would be read by every replay after the region freed it)."""
    import torch

    if torch.is_autocast_enabled("cuda"):
        raise Ungraphable("under autocast")
    if global_hooks() or any(hooked(m) for m in layer.modules()):
        raise Ungraphable("module hooks")
    tensors = [*layer.parameters(), *layer.buffers()]
    if any(t.device != device for t in tensors):
        raise Ungraphable("a layer across devices")
    held = tuple(tensor_key(t) + (t.data_ptr(), grads and t.requires_grad) for t in tensors)
    return held, layer.training


class Buffers:
    """Tensors shared by the graphs of one model, one per (role, layout): the layers' graphs run one at a time,
    each filling its inputs right before its replay and emptying its outputs right after."""

    def __init__(self) -> None:
        self.held: dict[tuple, Any] = {}

    def get(self, role: str, like: Any) -> Any:
        import torch

        key = (role, *tensor_key(like))
        if key not in self.held:  # the call's layout, unless it overlaps itself (an expanded view): then dense
            self.held[key] = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device) \
                if all(like.stride()) else torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return self.held[key]

    def matching(self, role: str, tensors: Sequence[Any]) -> list[Any]:
        """A buffer like each of `tensors` (None for None), the i-th under the role `role` + i."""
        return [None if t is None else self.get(f"{role}{i}", t) for i, t in enumerate(tensors)]


class GraphSet:
    """The graphs of one model: a capture stream and memory pool per device, shared buffers, stats."""

    def __init__(self) -> None:
        self.stats = GraphStats()
        self.buffers = Buffers()
        self.streams: dict[Any, tuple[Any, Any]] = {}  # device -> (capture stream, memory pool)
        self.off: str | None = None  # a failed capture: every layer of the model runs eagerly from then on

    def supports(self, hidden: Any) -> bool:
        """Whether a layer called on `hidden` can be captured: CUDA graphs hold CUDA work."""
        return bool(hidden.is_cuda)

    def random_state(self, device: Any) -> tuple:
        """What a call that draws random numbers changes: the device's generator, and the CPU's."""
        import torch

        return torch.cuda.get_rng_state(device), torch.get_rng_state()

    def _stream(self, device: Any) -> tuple[Any, Any]:
        import torch

        if device not in self.streams:
            with torch.cuda.device(device):
                self.streams[device] = torch.cuda.Stream(device), torch.cuda.graph_pool_handle()
        return self.streams[device]

    def warm_up(self, inputs: list[Any], body: Callable) -> tuple[list[Any], list[Any]]:
        """One run of `body` on the capture's stream into static input buffers, where lazy set-ups (library
        handles, workspaces) happen outside the capture and an operation that waits for the host raises, as the
        capture would fail on it. Returns the static inputs, filled, and the static outputs."""
        import torch

        device = _device(inputs)
        static = self.buffers.matching("in", inputs)
        stream, _ = self._stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                _fill(static, inputs)
                outputs, _ = body(static)
                static_out = self.buffers.matching("out", outputs)
                del outputs
        finally:
            torch.cuda.set_sync_debug_mode(mode)
            torch.cuda.current_stream(device).wait_stream(stream)
        return static, static_out

    def capture(self, static: list[Any], static_out: list[Any], body: Callable) -> tuple[Any, Any]:
        """(a graph of `body` on the static inputs that writes the static outputs, what the body returned
        besides its outputs)."""
        import torch

        device = _device(static)
        (stream, pool), graph = self._stream(device), torch.cuda.CUDAGraph()
        # Not torch.cuda.graph(): it also empties the pinned host cache at every capture, which the offloaded
        # checkpoints then pin again in the next step (about 0.5 s on an 8B model).
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.device(device), torch.cuda.stream(stream):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                outputs, extra = body(static)
                _fill(static_out, outputs)
                del outputs
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        # The warm-up's blocks are cached for the capture's stream, where nothing else allocates, and the eager
        # layer's working set is now the pool's: give both back (the pinned host cache stays).
        torch.cuda.empty_cache()
        return graph, extra


@dataclass
class _Graph:
    key: Any
    graph: Any
    inputs: list[Any]  # the static inputs, filled before each replay
    outputs: list[Any]  # the static outputs (None where the call returned None), copied out after it
    extra: Any  # what the capture returned besides its outputs


class GraphedCall:
    """One call site of one layer (its forward, or its backward), captured and replayed by signature.

    `run(key, inputs, body)`: `body(inputs)` computes `(outputs, extra)` from `inputs` (tensors or None); it is
    called eagerly on `inputs`, or captured on static copies of them. `key()` gives the call's signature, or
    raises Ungraphable. Returns `(outputs, extra)`: on a replay the outputs are fresh copies, and `extra` is what
    the capture's body returned.
    """

    def __init__(self, graphs: GraphSet, checks_random: bool = False):
        self.graphs, self.seen, self.captured = graphs, None, None
        self.off: str | None = None  # why this call runs eagerly for good
        self.checks_random = checks_random  # every eager run checks whether it drew random numbers (a forward)
        self.clean = False  # the last call drew none: a replay, or an eager run seen to draw none

    def run(self, key: Callable[[], Any], inputs: list[Any], body: Callable[[list[Any]], tuple]) -> tuple:

        off = self.off or self.graphs.off
        if off is not None:
            return self._eager(off, inputs, body)
        try:
            signature = key()
        except Ungraphable as why:
            return self._eager(str(why), inputs, body)
        if self.captured is not None and self.captured.key == signature:
            return self._replay(inputs)
        # A stale graph stays until its successor is captured: torch frees a pool (device and pinned host) once no
        # graph holds it, and a capture into a freed pool's handle fails. It is never replayed again.
        if self.seen != signature:
            reason = "first call of its signature" if self.captured is None else "signature changed"
            result = self._eager(reason, inputs, body, check_rng=True)
            if self.off is None:  # seen only once a whole run found it draws no random numbers
                self.seen = signature
            return result
        device = _device(inputs)
        before = self.graphs.random_state(device)
        try:
            static, static_out = self.graphs.warm_up(inputs, body)
        except Exception as error:  # noqa: BLE001 - an operation the capture could not hold: eager, which is exact
            self.off = f"warm-up failed (an operation that waits for the host?): {_first_line(error)}"
            return self._eager(self.off, inputs, body)
        if _drew(before, self.graphs.random_state(device)):
            self.off = "draws random numbers (dropout)"  # a change the signature does not read (a dropout's p)
            return self._eager(self.off, inputs, body)
        _fill(static, inputs)  # again: no cache keyed on a tensor's version hands the warm-up's result on
        try:
            graph, extra = self.graphs.capture(static, static_out, body)
        except Exception as error:  # noqa: BLE001 - no capture; the eager call is exact
            # A failed capture can leave CUDA's allocator and random generator in capture mode, where a second
            # one fails too: the whole model stops capturing.
            self.graphs.off = self.off = f"capture failed: {_first_line(error)}"
            return self._eager(self.off, inputs, body)
        self.captured = _Graph(signature, graph, static, static_out, extra)
        self.graphs.stats.captured += 1
        return self._replay(inputs)

    def _eager(self, reason: str, inputs: list[Any], body: Callable, check_rng: bool = False) -> tuple:

        self.graphs.stats.ran_eagerly(reason)
        self.clean = False
        if not (check_rng or self.checks_random):
            return body(inputs)
        device = _device(inputs)
        before = self.graphs.random_state(device)
        result = body(inputs)
        after = self.graphs.random_state(device)
        self.clean = not _drew(before, after)
        if not self.clean:
            self.off = "draws random numbers (dropout)"
        return result

    def _replay(self, inputs: list[Any]) -> tuple:
        captured = self.captured
        _fill(captured.inputs, inputs)
        captured.graph.replay()
        self.clean = True
        self.graphs.stats.replayed += 1
        return [None if t is None else t.clone() for t in captured.outputs], captured.extra


def _device(tensors: Sequence[Any]) -> Any:
    return next(t.device for t in tensors if t is not None)


def _drew(before: tuple, after: tuple) -> bool:
    import torch

    return any(not torch.equal(a, b) for a, b in zip(before, after))


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"


def _fill(static: list[Any], values: Sequence[Any]) -> None:
    for s, v in zip(static, values):
        if s is not None:
            s.copy_(v)


Record = Callable[[Callable[..., Any], Any, Sequence[Any]], tuple[Any, list[Any], Layout]]


class LayerGraphs:
    """The graphed forward and backward of one checkpointed layer."""

    def __init__(self, graphs: GraphSet, layer: Any):
        self.layer, self.set = layer, graphs
        self.forward_call, self.backward_call = GraphedCall(graphs, checks_random=True), GraphedCall(graphs)
        self.recorded: dict | None = None  # the projections the last forward recorded: {id: (module, parts)}

    def forward(self, record: Record, function: Callable[..., Any], hidden: Any, rest: Sequence[Any]) -> tuple:
        """`record(function, hidden, rest)` -> (output, kept tensors, their layout): run, or replayed. Then
        `forward_call.clean` says whether the forward drew no random numbers, which a replay without the
        forward's random state would draw otherwise: one condition for the backward to take `backward`."""
        import torch

        call, why = _call_or_why(function, rest)

        def key() -> tuple:
            if call is None:
                raise Ungraphable(why)
            parts = None if self.recorded is None else parts_key(current_parts(self.recorded))  # None: not known yet
            # With which parameters train: a layer records its attention only where its q/k norms do not
            return call.key, tensor_key(hidden), layer_key(self.layer, True, hidden.device), parts

        def body(inputs: list[Any]) -> tuple:
            if call is None:
                out, kept, layout = record(function, hidden, rest)
            else:
                again, again_rest = call.rebuilt(inputs[1:])
                out, kept, layout = record(again, inputs[0], again_rest)
            first, tail = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            if tail and any(torch.is_tensor(t) for t in tail):  # attention weights: a replay would repeat them
                self.forward_call.off = self.forward_call.off or "the layer returns more than one tensor"
            return [first, *kept], (tail, layout)

        known = self.recorded is not None
        outputs, (tail, layout) = self.forward_call.run(key, [hidden, *([] if call is None else call.tensors)], body)
        self.recorded = layout.parts
        if not known and self.forward_call.seen is not None:  # the first call learnt which projections the layer
            try:                                                 # records: its signature is complete now
                self.forward_call.seen = key()
            except Ungraphable:
                self.forward_call.seen = None
        first, kept = outputs[0], outputs[1:]
        return (first if tail is None else (first, *tail)), kept, layout

    def backward(self, function: Callable[..., Any], hidden: Any, kept: list[Any], rest: Sequence[Any], grad: Any,
                 params: list[Any], layout: Layout, mode: str) -> list[Any]:
        """[d hidden, *d params] of the layer's replay in `mode` (REPLAY with the `kept` tensors of a recording
        of `layout`, or RECOMPUTE), its projections taking `layout.parts`: run, or replayed."""
        import torch

        call, why = _call_or_why(function, rest)
        count, parts = len(kept), layout.parts

        def key() -> tuple:
            if call is None:
                raise Ungraphable(why)
            return mode, call.key, tuple(tensor_key(t) for t in (hidden, grad, *kept)), layout.sums, \
                layout.attention_calls, layer_key(self.layer, True, hidden.device), parts_key(parts), \
                tuple(id(p) for p in params)

        def body(inputs: list[Any]) -> tuple:
            # The gradients are taken with respect to aliases of the parameters, which the layer holds for the
            # call: a parameter's own gradient node belongs to the step's forward, on the training stream, and
            # autograd would synchronise the capture's stream with that one, which a capture cannot hold.
            aliases = {id(p): p.detach().requires_grad_(True) for p in params}
            leaf = inputs[0].detach().requires_grad_(True)
            again, again_rest = (function, rest) if call is None else call.rebuilt(inputs[2 + count:])
            tape = Tape.replaying(inputs[2:2 + count], layout) if mode == REPLAY else Tape(mode)
            tape.parts = {k: (m, _aliased(p, aliases)) for k, (m, p) in parts.items()}
            with _holding(self.layer, aliases), taping(tape), torch.enable_grad():
                out = again(leaf, *again_rest)
            out = out[0] if isinstance(out, tuple) else out
            wrt = [leaf, *[aliases[id(p)] for p in params]]
            return list(torch.autograd.grad(out, wrt, inputs[1], allow_unused=True)), None

        inputs = [hidden, grad, *kept, *([] if call is None else call.tensors)]
        return self.backward_call.run(key, inputs, body)[0]


def _call_or_why(function: Callable[..., Any], rest: Sequence[Any]) -> tuple[Call | None, str]:
    try:
        return Call(function, rest), ""
    except Ungraphable as why:
        return None, str(why)


def _aliased(parts: Any, aliases: dict[int, Any]) -> Any:
    """`parts` with each tensor that `aliases` maps replaced by its alias."""
    if parts is None:
        return None
    found = {f: aliases[id(v)] for f, v in zip(parts._fields, parts) if id(v) in aliases}
    return parts._replace(**found) if found else parts


@contextlib.contextmanager
def _holding(layer: Any, aliases: dict[int, Any]) -> Iterator[None]:
    """The layer's modules hold the aliases in place of their parameters for the call, and their own after."""
    swapped = []
    for module in layer.modules():
        own = module._parameters
        for name, p in own.items():
            if p is not None and id(p) in aliases:
                swapped.append((own, name, p))
                own[name] = aliases[id(p)]
    try:
        yield
    finally:
        for own, name, p in swapped:
            own[name] = p
