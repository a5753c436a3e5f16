"""When a checkpointed layer's graphs are captured, replayed, dropped and given up (graphs.py), on the CPU.

The signatures are tested as they are. For the calls, `ReplayingGraphs` is a STAND-IN for CUDA graphs, built
from what a CUDA graph does: it is captured from one run of the call on static input buffers and then, at each
replay, computes the same call on whatever those buffers hold, writing the static outputs, while the call's
Python runs no more (the stand-in reruns it, on the buffers). It stands in for the device's graph mechanics
alone: the layers' bodies, aliases, tapes and copies are the runtime's own. The same behaviours with real CUDA
graphs, bitwise against the eager run, are in test_graphs_gpu.py and kernels/test_dequant4bit_gpu.py.
"""
import functools

import pytest
import torch
from adapter_doctor.runtime import checkpoint, enable_offloaded_checkpointing, ensure_patched, host_plan
from adapter_doctor.runtime.graphs import (
    Call,
    GraphedCall,
    GraphSet,
    GraphStats,
    LayerGraphs,
    Ungraphable,
    _fill,
    current_parts,
    layer_key,
    parts_key,
)
from adapter_doctor.runtime.tape import Layout


def forward(layer, hidden, scale=1.0, position_embeddings=None, mask=None):
    cos, sin = position_embeddings
    return layer(hidden) * scale + cos.sum() + sin.sum() + (0 if mask is None else mask.sum())


def test_a_call_is_split_into_its_signature_and_tensors_and_rebuilt_around_others():
    layer = torch.nn.Linear(4, 4)
    cos, sin = torch.ones(3), torch.zeros(3)
    call = Call(functools.partial(forward, layer, scale=2.0, position_embeddings=(cos, sin), mask=None), ())
    assert len(call.tensors) == 2 and call.tensors[0] is cos and call.tensors[1] is sin
    function, rest = call.rebuilt([torch.full((3,), 2.0), torch.full((3,), 3.0)])
    hidden = torch.randn(2, 4)
    assert rest == ()
    assert torch.equal(function(hidden), layer(hidden) * 2.0 + 6.0 + 9.0)

    def key(**change):
        options = {"scale": 2.0, "position_embeddings": (cos, sin), "mask": None, **change}
        return Call(functools.partial(forward, layer, **options), ()).key

    assert key() == key(position_embeddings=(torch.ones(3), torch.zeros(3)))  # same layouts, other values
    assert key() != key(scale=3.0)
    assert key() != key(position_embeddings=(torch.ones(4), sin))
    assert key() != key(position_embeddings=(cos.double(), sin))
    assert key() != key(mask=torch.ones(3))
    assert key() != Call(functools.partial(forward, torch.nn.Linear(4, 4), scale=2.0,
                                           position_embeddings=(cos, sin)), ()).key  # another layer


def test_an_argument_of_unknown_kind_makes_the_call_ungraphable():
    class Cache:
        pass

    with pytest.raises(Ungraphable, match="an argument of type Cache"):
        Call(functools.partial(forward, torch.nn.Linear(4, 4), mask=Cache()), ())


def lora_layer(tiny):
    model = tiny.lora(tiny.base())
    return model, model.base_model.model.model.layers[0]


def recorded(layer):
    modules = [m for m in layer.modules() if hasattr(m, "lora_A")]
    return {id(m): (m, None) for m in modules}


def test_the_parts_signature_follows_the_adapters_state(tiny):
    model, layer = lora_layer(tiny)
    record = recorded(layer)
    first = parts_key(current_parts(record))
    assert parts_key(current_parts(record)) == first  # read again: the same (fresh `.data` views included)
    tiny.scale_lora(model, 2.0)
    assert parts_key(current_parts(record)) != first
    tiny.scale_lora(model, 0.5)
    assert parts_key(current_parts(record)) == first
    q = layer.self_attn.q_proj
    q.lora_A["default"].weight = torch.nn.Parameter(q.lora_A["default"].weight.detach().clone())
    assert parts_key(current_parts(record)) != first  # a rebound parameter: another address
    with model.disable_adapter(), pytest.raises(Ungraphable, match="runs as a PEFT module"):
        parts_key(current_parts(record))


def test_the_layer_signature_follows_mode_addresses_and_for_the_backward_requires_grad(tiny):
    _, layer = lora_layer(tiny)
    layer.train()
    cpu = torch.device("cpu")
    forward_key, backward_key = layer_key(layer, False, cpu), layer_key(layer, True, cpu)
    norm = layer.input_layernorm.weight
    norm.requires_grad_(not norm.requires_grad)
    assert layer_key(layer, False, cpu) == forward_key and layer_key(layer, True, cpu) != backward_key
    norm.requires_grad_(not norm.requires_grad)
    layer.eval()
    assert layer_key(layer, False, cpu) != forward_key
    layer.train()
    layer.input_layernorm.weight = torch.nn.Parameter(norm.detach().clone())
    assert layer_key(layer, False, cpu) != forward_key


def test_what_a_graph_cannot_replay_is_refused(tiny, monkeypatch):
    _, layer = lora_layer(tiny)
    cpu = torch.device("cpu")
    with pytest.raises(Ungraphable, match="a layer across devices"):
        layer_key(layer, False, torch.device("meta"))  # the input elsewhere than the layer's weights
    handle = layer.mlp.register_forward_hook(lambda *args: None)
    with pytest.raises(Ungraphable, match="module hooks"):  # a replay would skip the hook
        layer_key(layer, False, cpu)
    handle.remove()
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    with pytest.raises(Ungraphable, match="under autocast"):
        layer_key(layer, False, cpu)
    cu = torch.tensor([0, 5, 13])
    with pytest.raises(Ungraphable, match="a packed batch"):
        Call(functools.partial(forward, layer, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8), ())


def test_graphs_are_off_by_default_and_count_nothing_off_the_gpu(tiny):
    model = tiny.lora(tiny.base())
    enable_offloaded_checkpointing(model)
    assert host_plan(model).graphs is None
    other = tiny.lora(tiny.base())
    ensure_patched(other)
    enable_offloaded_checkpointing(other, cuda_graphs=True)
    tiny.run(other, tiny.batch())
    assert host_plan(other).graphs == GraphStats()  # CPU tensors: every layer ran as before, uncounted


class ReplayingGraphs(GraphSet):
    """STAND-IN for a model's CUDA graphs on the CPU (see the module docstring)."""

    fail: str | None = None  # "warm_up" or "capture": raise there, as an operation the capture cannot hold does

    def supports(self, hidden):
        return True

    def random_state(self, device):
        return (torch.get_rng_state(),)

    def warm_up(self, inputs, body):
        if self.fail == "warm_up":
            raise RuntimeError("CUDA call made while synchronisation is an error")
        static = self.buffers.matching("in", inputs)
        _fill(static, inputs)
        outputs, _ = body(static)
        return static, self.buffers.matching("out", outputs)

    def capture(self, static, static_out, body):
        if self.fail == "capture":
            raise RuntimeError("operation not permitted when stream is capturing")
        _, extra = body(static)

        class Graph:
            replays = 0

            def replay(self):
                Graph.replays += 1
                _fill(static_out, body(static)[0])

        return Graph(), extra


@pytest.fixture
def replaying(monkeypatch):
    made = []

    def make():
        made.append(ReplayingGraphs())
        return made[-1]

    monkeypatch.setattr(checkpoint, "GraphSet", make)
    return made


def checkpointed(tiny, graphs, **overrides):
    model = tiny.lora(tiny.base(**overrides))
    ensure_patched(model, kernels="torch")
    enable_offloaded_checkpointing(model, cuda_graphs=graphs)
    return model


def train(model, batches, changes=None, autocast=False):
    """Losses and the final trainable weights of an AdamW run over `batches`; changes[i](model) before step i;
    the forwards under CPU autocast in bf16 with `autocast`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for i, ids in enumerate(batches):
        if changes and i in changes:
            changes[i](model)
        torch.manual_seed(i)  # dropout draws the same in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_training(tiny, batches, changes=None, fail=None, autocast=False, **overrides):
    """The graphs' stats after training with them, checked against the same training without."""
    eager = train(checkpointed(tiny, False, **overrides), batches, changes, autocast)
    model = checkpointed(tiny, True, **overrides)
    ReplayingGraphs.fail = fail
    try:
        graphed = train(model, batches, changes, autocast)
    finally:
        ReplayingGraphs.fail = None
    assert torch.allclose(graphed[0], eager[0], rtol=1e-6, atol=1e-7), (graphed[0], eager[0])
    assert graphed[1].keys() == eager[1].keys()
    for name, weight in eager[1].items():
        assert torch.allclose(graphed[1][name], weight, rtol=1e-5, atol=1e-7), name
    return host_plan(model).graphs


def batches(tiny, count, length=13, first=0):
    return [tiny.batch(seed=s, length=length) for s in range(first, first + count)]


def test_each_call_is_seen_once_captured_once_then_replayed(tiny, replaying):
    stats = same_training(tiny, batches(tiny, 5))
    # 2 layers, forward and backward each: seen at step 0, captured at step 1 and replayed from then on
    assert stats == GraphStats(captured=4, replayed=4 * 4, eager={"first call of its signature": 4})


def test_a_rescaled_adapter_and_a_new_batch_shape_are_captured_again(tiny, replaying):
    # steps 0-2, rescaled at 3 (eager), captured again at 4; the longer batches eager at 6, captured at 7
    steps = batches(tiny, 6) + batches(tiny, 3, length=21, first=6)
    stats = same_training(tiny, steps, {3: lambda m: tiny.scale_lora(m, 1.5)})
    assert stats == GraphStats(captured=12, replayed=4 * 6,
                               eager={"first call of its signature": 4, "signature changed": 8})


def test_a_backward_after_a_forward_under_autocast_is_not_graphed(tiny, replaying):
    # The backward runs outside the forward's autocast block: the eager one restores it, a graphed one would
    # recompute in other dtypes. (On CUDA the forward under autocast is refused too; the stand-in graphs it.)
    stats = same_training(tiny, batches(tiny, 4), autocast=True)
    # the forwards: seen at step 0, captured at step 1 and replayed from then on; no backward is tried
    assert stats == GraphStats(captured=2, replayed=2 * 3, eager={"first call of its signature": 2}), stats


def test_a_backward_inside_an_autocast_block_after_a_plain_forward_is_not_graphed(tiny, replaying):
    # The forward ran without autocast, so the replay must too: the eager backward restores that; a graph
    # captured inside the caller's autocast block would replay the layer in bf16.
    def grads(model, ids):
        loss = model(input_ids=ids, labels=ids).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return got

    eager, graphed = checkpointed(tiny, False), checkpointed(tiny, True)
    for model in (eager, graphed):
        model.train()
    for ids in batches(tiny, 3):
        expected, got = grads(eager, ids), grads(graphed, ids)
        for name, grad in expected.items():
            assert torch.allclose(got[name], grad, rtol=1e-6, atol=1e-8), name
    assert host_plan(graphed).graphs.captured == 2  # the forwards alone


def test_a_layer_that_draws_random_numbers_is_never_captured(tiny, replaying):
    stats = same_training(tiny, batches(tiny, 3), attention_dropout=0.5)
    assert stats.captured == stats.replayed == 0
    # the first forward of each layer finds it out; its backward then replays as before, outside the graphs
    assert stats.eager == {"first call of its signature": 2, "draws random numbers (dropout)": 4}


def test_a_lora_layer_run_as_a_peft_module_keeps_its_layer_eager(tiny, replaying):
    def disable_one(model):  # layer 0's q_proj runs its base alone, through PEFT's forward
        model.base_model.model.model.layers[0].self_attn.q_proj._disable_adapters = True

    stats = same_training(tiny, batches(tiny, 3), {0: disable_one})
    assert stats.captured == 2  # layer 1, forward and backward
    # layer 0: its first forward learns the signature cannot hold; every later call and every backward says why
    assert stats.eager == {"first call of its signature": 3, "a LoRA projection runs as a PEFT module": 5}, stats


@pytest.mark.parametrize("fail,reason", [("warm_up", "warm-up failed"), ("capture", "capture failed")])
def test_a_call_that_cannot_be_captured_runs_eagerly_and_exactly(tiny, replaying, fail, reason):
    stats = same_training(tiny, batches(tiny, 4), fail=fail)
    assert stats.captured == stats.replayed == 0
    off = [k for k in stats.eager if k.startswith(reason)]
    assert len(off) == 1 and "RuntimeError" in off[0], stats
    if fail == "capture":  # the first failure stops the whole model's captures
        assert replaying[-1].off == off[0]
        assert stats.eager[off[0]] == 4 * 3  # steps 1-3, both layers, forward and backward


def test_an_adapter_with_dropout_switched_in_replays_with_the_forwards_random_state(tiny, replaying):
    def dropout(model):  # its projections run as PEFT modules now, drawing random numbers
        for layer in model.base_model.model.model.layers:
            layer.mlp.up_proj.lora_dropout["default"] = torch.nn.Dropout(0.3)

    stats = same_training(tiny, batches(tiny, 5), {3: dropout})  # the same masks in the replays as eager
    # step 3: the PEFT modules keep both layers eager, and draw; from step 4 the layers stay eager for it
    assert stats.captured == 4 and stats.eager["a LoRA projection runs as a PEFT module"] == 2, stats
    assert stats.eager["draws random numbers (dropout)"] == 2, stats


def test_a_call_is_seen_only_once_a_whole_run_checked_it(tiny):
    calls = GraphedCall(ReplayingGraphs())
    versions = []

    def body(inputs):
        versions.append(inputs[0]._version)
        if len(versions) == 1:
            raise RuntimeError("out of memory")  # the first run fails: nothing learnt about its random numbers
        return [inputs[0] * 2], None

    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="out of memory"):
        calls.run(lambda: "key", [x], body)
    assert calls.seen is None
    calls.run(lambda: "key", [x], body)  # a first call again, checked
    assert calls.captured is None and calls.seen == "key"
    out, _ = calls.run(lambda: "key", [x + 1], body)  # warm-up, capture, replay
    assert torch.equal(out[0], (x + 1) * 2) and calls.captured is not None
    warm_up, capture = versions[2], versions[3]
    assert capture != warm_up  # copied in again: a cache keyed on the version cannot hand the warm-up's on


def test_a_change_only_the_warm_up_sees_drawing_random_numbers_is_not_captured():
    calls = GraphedCall(ReplayingGraphs())
    drop = {"p": 0.0}

    def body(inputs):
        return [torch.nn.functional.dropout(inputs[0], drop["p"])], None

    x = torch.ones(8)
    calls.run(lambda: "key", [x], body)  # seen, drawing nothing
    drop["p"] = 0.5  # which the key does not read
    calls.run(lambda: "key", [x], body)
    assert calls.captured is None and calls.off == "draws random numbers (dropout)"


def test_a_layer_returning_more_than_one_tensor_turns_off_its_own_call():
    graphs = ReplayingGraphs()
    layer = torch.nn.Linear(4, 4)
    layers = LayerGraphs(graphs, layer)

    def record(function, hidden, rest):
        out = function(hidden, *rest)
        return (out, out.sum()), [], Layout({}, 0, ())  # the output and, say, attention weights

    for _ in range(3):
        out, _, _ = layers.forward(record, layer, torch.ones(2, 4), ())
        assert isinstance(out, tuple) and len(out) == 2
    assert layers.forward_call.off == "the layer returns more than one tensor" and graphs.off is None
    assert graphs.stats.captured == 0
