"""Offloaded layer checkpointing computes the same gradients as no checkpointing."""
import pytest
import torch
import transformers
from adapter_doctor.runtime import ensure_patched
from adapter_doctor.runtime.checkpoint import enable_offloaded_checkpointing
from peft import LoraConfig, get_peft_model

BATCH = torch.arange(2 * 12).reshape(2, 12) % 60 + 2


def lora_llama(attn: str = "sdpa"):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, attn_implementation=attn)
    model = get_peft_model(transformers.LlamaForCausalLM(config), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def grads(model):
    model.train()
    loss = model(input_ids=BATCH, labels=BATCH).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_checkpointing_matches_plain_training():
    loss, expected = grads(lora_llama())
    for patch in (False, True):
        model = lora_llama()
        if patch:
            ensure_patched(model)
        assert enable_offloaded_checkpointing(model) == 3
        got_loss, got = grads(model)
        assert torch.allclose(got_loss, loss)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7), name



@pytest.mark.parametrize("patch", [False, True])
def test_under_autocast_the_replay_computes_in_the_forwards_dtypes(patch):
    # Trainer runs the forward alone under autocast; the backward's replay must compute as the forward did, as
    # torch's own checkpoint replays it, or the gradients are another function's (about 1% off here without
    # the forward's autocast restored). Torch's checkpoint, not plain training, is the reference: under
    # transformers 4.57 both checkpoints differ from plain training under autocast, by the same 0.8%.
    def autocast_grads(model):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=BATCH, labels=BATCH).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def made(checkpointing):
        model = lora_llama()
        if patch:
            ensure_patched(model)
        checkpointing(model)
        return model

    loss, expected = autocast_grads(made(lambda m: m.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})))
    got_loss, got = autocast_grads(made(enable_offloaded_checkpointing))
    assert torch.equal(got_loss, loss)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7), name


def test_every_other_layer_checkpointed_gives_the_same_gradients():
    loss, expected = grads(lora_llama())
    model = lora_llama()
    ensure_patched(model)
    assert enable_offloaded_checkpointing(model, every_n_layers=2) == 2  # layers 0 and 2 of 3
    flags = [layer.gradient_checkpointing for layer in model.base_model.model.model.layers]
    assert flags == [True, False, True]
    got_loss, got = grads(model)
    assert torch.allclose(got_loss, loss)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7), name


def test_a_second_backward_through_offloaded_tensors_says_why_it_cannot():
    # On CUDA the first backward takes a layer's tensors back from the host and frees the host copies, so a
    # retained graph's second backward finds none: a clear error, not a TypeError from deep inside.
    from adapter_doctor.runtime.checkpoint import _Saved

    saved = object.__new__(_Saved)
    saved.cuda, saved.host, saved.fetched, saved.budget = True, None, None, None
    with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
        saved.take()


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_every_n_layers_must_be_a_positive_whole_number(bad):
    with pytest.raises(ValueError, match="every_n_layers"):
        enable_offloaded_checkpointing(lora_llama(), every_n_layers=bad)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("host_blocks", [None, 2])  # 2: two layers keep their input alone, one keeps it on the GPU
def test_offloaded_checkpointing_on_the_gpu_matches_plain_training(host_blocks):
    """The CUDA path: copies to pinned memory on a side stream, prefetches back, replays with Triton kernels."""
    def on_gpu():
        model = lora_llama().cuda()
        ensure_patched(model)
        return model

    batch = BATCH.cuda()
    plain = on_gpu()
    plain.train()
    plain(input_ids=batch, labels=batch).loss.backward()
    model = on_gpu()
    budget = None if host_blocks is None else host_blocks * 4096 / 2**30
    assert enable_offloaded_checkpointing(model, host_memory_gib=budget) == 3
    losses = []  # kept, as training loops keep the last loss: its graph (and its layers' records) stays alive
    for _ in range(3):  # later steps reuse the cached pinned blocks and the side stream
        model.zero_grad(set_to_none=True)
        model.train()
        losses.append(model(input_ids=batch, labels=batch).loss)
        losses[-1].backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), model.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6), name
    if host_blocks is not None:
        from adapter_doctor.runtime import host_plan

        plan = host_plan(model)
        assert (plan.layers_offloaded, plan.layers_input_only, plan.layers_on_device) == (0, 6, 3)  # 3 steps
        assert plan.held == 0 and plan.pending == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tensor_of_no_power_of_two_size_goes_to_the_host_in_pieces_and_comes_back_equal(dtype):
    from adapter_doctor.runtime.checkpoint import HostBudget, _pieces, _Saved

    t = torch.randn(3, 1_000_003, device="cuda").to(dtype)
    other = torch.randn(5, 7, device="cuda")[:, ::2]  # not contiguous
    budget = HostBudget(None, layers=1)
    saved = _Saved([t, other], t.device, budget)
    assert len(saved.host[0]) == len(_pieces(t.numel() * t.element_size())) > 1
    assert budget.held == sum(_pieces(t.numel() * t.element_size())) + sum(_pieces(other.numel() * 4))
    back, other_back = saved.take()
    torch.cuda.synchronize()
    assert back.dtype == dtype and torch.equal(back, t)
    assert torch.equal(other_back, other)
    assert budget.held == 0 and budget.pending == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("held", [True, False])  # False: layers over _HOLD_BYTES, handed to the allocator at once
def test_copies_that_fall_behind_the_forward_reuse_blocks_and_the_tensors_come_back_equal(held, monkeypatch):
    """With the host far ahead of the copies to the host (the side stream sleeps first), a forward would take
    fresh GPU blocks for every layer if its saved tensors' blocks waited for the host to see the copies end;
    instead each layer orders the stream after the copies of the layer two before it, and the blocks serve
    again. Larger layers go to the allocator at once, as before; both come back equal."""
    from adapter_doctor.runtime import checkpoint

    layers, size = 12, 32 << 20
    if not held:
        monkeypatch.setattr(checkpoint, "_HOLD_BYTES", size - 1)
    device = torch.device("cuda", torch.cuda.current_device())
    side = checkpoint._side_stream(device)
    budget = checkpoint.HostBudget(None, layers=layers)

    def forward() -> list:
        saved = []
        for i in range(layers):
            t = torch.full((size // 2,), float(i), dtype=torch.bfloat16, device=device)
            saved.append(checkpoint._Saved([t], device, budget, last=i == layers - 1))
            assert (saved[-1].sources is None) == (not held or i == layers - 1)
            del t
        return saved

    def backward(saved: list) -> None:
        torch.cuda._sleep(1_000_000_000)  # the current stream behind the host too: nothing waits for the host
        wrong = []
        for i in reversed(range(layers)):
            (back,) = saved[i].take()
            wrong.append((back != float(i)).any())
            del back
        assert not torch.stack(wrong).any().item()

    backward(forward())  # pins the host blocks once: a fresh pinned allocation may wait for the GPU
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # about a second: the copies fall far behind the host
    saved = forward()
    assert not side.query()  # the premise: the host ran ahead of the copies
    grown = torch.cuda.memory_reserved() - before
    bound = (checkpoint._IN_FLIGHT + 2) * size
    if held:
        assert grown <= bound, f"{grown / size:.1f} layers' blocks for {layers} layers"
    else:  # the premise again: handed to the allocator, the blocks wait for the host to see the copies end
        assert grown > bound
    before = torch.cuda.memory_reserved()
    backward(saved)
    assert torch.cuda.memory_reserved() - before <= bound  # the copies back reuse blocks too
    assert budget.held == 0 and budget.pending == 0


def test_only_the_last_checkpointed_layer_is_marked_last():
    model = lora_llama()
    assert enable_offloaded_checkpointing(model, every_n_layers=2) == 2
    layers = model.base_model.model.model.layers
    marks = [getattr(layer._gradient_checkpointing_func, "keywords", {}).get("last_layer") for layer in layers]
    assert marks == [False, None, True]
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True]


def test_a_host_budget_keeps_what_fits_and_the_gradients_stay_exact():
    from adapter_doctor.runtime import host_plan

    loss, expected = grads(lora_llama())
    model = lora_llama()
    ensure_patched(model)
    # Each layer saves its input and its inner residual sum, 2x12x32 fp32 each: 3,072 bytes, pinned as 4,096.
    # Three blocks of room: the three inputs come first, so no layer keeps its sum too.
    enable_offloaded_checkpointing(model, host_memory_gib=3 * 4096 / 2**30)
    got_loss, got = grads(model)
    plan = host_plan(model)
    assert (plan.layers_offloaded, plan.layers_input_only, plan.layers_on_device) == (0, 3, 0)
    assert plan.peak == plan.limit == 3 * 4096
    assert plan.held == 0 and plan.pending == 0  # every layer's share given back by its backward
    assert torch.allclose(got_loss, loss)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7), name


# What each layer of lora_llama keeps, pinned: its input and inner sum, 2x12x32 fp32 each (3,072 bytes, pinned as
# 4,096), and its attention's q, k, v, output and log-sum-exp (4,096 + 2,048 + 2,048 + 4,096 + 512 pinned).
INPUT, ATTENTION = 4096, 12_800
WHOLE = 2 * INPUT + ATTENTION


@pytest.mark.parametrize("attn,room,plan", [
    ("sdpa", 3 * WHOLE, (3, 0, 0, 0)),  # room for everything
    ("sdpa", 2 * WHOLE + 2 * INPUT, (2, 1, 0, 0)),  # layers 0 and 1 keep everything, leaving room for a sum
    ("sdpa", 6 * INPUT + ATTENTION, (1, 2, 0, 0)),  # the later layers' sums come before a layer's attention
    ("sdpa", 6 * INPUT, (0, 3, 0, 0)),  # inputs and sums fit, the attention's tensors do not
    ("sdpa", 5 * INPUT, (0, 2, 1, 0)),
    ("sdpa", 2 * INPUT, (0, 0, 2, 1)),  # two inputs fit; the last layer keeps its own on the GPU
    ("sdpa", INPUT / 2, (0, 0, 0, 3)),
    # eager attention records nothing: the input and the sum are all a layer keeps
    ("eager", 6 * INPUT, (3, 0, 0, 0)),
    ("eager", 5 * INPUT, (2, 0, 1, 0)),
    ("eager", 2 * INPUT, (0, 0, 2, 1)),
])
def test_the_plan_keeps_every_layers_input_on_the_host_before_any_inner_sum(attn, room, plan):
    from adapter_doctor.runtime import host_plan

    loss, expected = grads(lora_llama(attn))
    model = lora_llama(attn)
    ensure_patched(model)
    enable_offloaded_checkpointing(model, host_memory_gib=room / 2**30)
    got_loss, got = grads(model)
    budget = host_plan(model)
    assert budget.layers == 3
    assert (budget.layers_offloaded, budget.layers_without_attention, budget.layers_input_only,
            budget.layers_on_device) == plan
    assert budget.held == 0 and budget.pending == 0
    assert torch.allclose(got_loss, loss)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("nbytes", [0, 1, 3072, 4096, 2**20 + 1, 3 * 2**20, 400_000 * 4096 * 2, 2**31, 2**31 + 2])
def test_pinned_pieces_are_powers_of_two_that_hold_the_tensor_and_waste_little(nbytes):
    from adapter_doctor.runtime.checkpoint import _pieces

    pieces = _pieces(nbytes)
    assert all(p > 0 and p & (p - 1) == 0 for p in pieces)
    assert sum(pieces) >= nbytes and pieces == sorted(pieces, reverse=True)
    if nbytes > 64 * 2**20:  # past the 1 MiB floor: under 1/64 of the tensor wasted, in a handful of pieces
        assert sum(pieces) - nbytes < nbytes / 64 and len(pieces) <= 7
    else:  # small tensors: one block, or whole MiB blocks and one more
        assert sum(pieces) - nbytes < max(nbytes, 2**20)
    if nbytes == 400_000 * 4096 * 2:  # an 8B layer's input at 400K tokens: 3.05 GiB, 4 GiB as one block
        assert sum(pieces) / 2**30 < 3.07


def test_the_default_host_budget_is_most_of_the_available_memory_and_is_returned_by_abandoned_steps():
    from adapter_doctor.runtime import host_plan
    from adapter_doctor.runtime.checkpoint import available_host_memory

    model = lora_llama()
    ensure_patched(model)
    before = available_host_memory()
    enable_offloaded_checkpointing(model)
    after = available_host_memory()  # other processes may take or give back memory in between
    plan = host_plan(model)
    assert before and after and 0.8 * min(before, after) < plan.limit <= 0.9 * max(before, after)
    model.train()
    loss = model(input_ids=BATCH, labels=BATCH).loss  # a forward whose backward never comes
    assert plan.layers_offloaded == 3 and plan.held == 3 * WHOLE and plan.pending == 3
    del loss
    import gc

    gc.collect()
    assert plan.held == 0 and plan.pending == 0


@pytest.mark.parametrize("bad", [0, -2.0])
def test_host_memory_gib_must_be_positive(bad):
    with pytest.raises(ValueError, match="host_memory_gib"):
        enable_offloaded_checkpointing(lora_llama(), host_memory_gib=bad)


class _FakeCuda:
    """What _Saved asks of torch.cuda, recorded: streams that log their waits, events that know their stream
    and the order they were made in, copies to the host that clone."""

    def __init__(self):
        self.log = []
        self.compute = self.Stream("compute", self.log)
        self.side = self.Stream("side", self.log)

    class Stream:
        def __init__(self, name, log):
            self.name, self.log = name, log

        def wait_event(self, event):
            self.log.append(("wait", self.name, event.index))

        def wait_stream(self, other):
            self.log.append(("after", self.name, other.name))

    class Event:
        def record(self, stream):
            self.stream = stream

    def install(self, monkeypatch, checkpoint):
        import itertools

        made = itertools.count()

        def event():
            e = self.Event()
            e.index = next(made)
            return e

        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.compute)
        monkeypatch.setattr(torch.cuda, "Event", event)
        monkeypatch.setattr(checkpoint, "_side_stream", lambda device: self.side)
        monkeypatch.setattr(checkpoint, "_to_host", lambda t, stream: [(t.clone(), 0)])
        monkeypatch.setattr(checkpoint, "_after_copies", lambda tensors, device: self.log.append(
            ("let go", device.index, [float(t[0]) for t in tensors])))
        monkeypatch.setattr(checkpoint, "_UNSETTLED", {})
        monkeypatch.setattr(checkpoint, "_LAST", {})

    def waits(self):
        """The log without the side stream's waits for the compute stream (checked once, below)."""
        return [entry for entry in self.log if entry != ("after", "side", "compute")]


def test_each_forward_settles_the_layer_two_before_it_and_the_last_lets_the_rest_go(monkeypatch):
    """The stream ordering of the saved tensors' blocks, on the CPU with a recording stand-in for the CUDA
    calls (the GPU test above checks the memory it saves): layer i's forward orders the compute stream after
    the copies of layer i - 2 and drops that layer's tensors; a layer over _HOLD_BYTES, the step's last layer
    and a layer dropped before its backward hand theirs to the allocator instead, on every device."""
    from adapter_doctor.runtime import checkpoint

    fake = _FakeCuda()
    fake.install(monkeypatch, checkpoint)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    size = 1024  # bytes a layer: far under _HOLD_BYTES

    def layer(i, device=cuda0, last=False):
        return checkpoint._Saved([torch.full((size // 4,), float(i))], device, last=last)

    saved = [layer(i) for i in range(4)]  # events 0 to 3, each recorded on the side stream after the compute
    assert fake.log.count(("after", "side", "compute")) == 4
    assert all(s.copied.stream is fake.side for s in saved)
    assert fake.waits() == [("wait", "compute", 0), ("wait", "compute", 1)]  # layers 0 and 1, by 2 and 3
    assert [s.sources is None for s in saved] == [True, True, False, False]
    other = layer(9, device=cuda1)  # a later GPU of a split model: its own queue (event 4)
    assert other.sources is not None and len(fake.waits()) == 2
    fake.log.clear()
    saved.append(layer(4, last=True))  # settles layer 2, then lets 3, itself and the other GPU's go
    assert fake.waits() == [("wait", "compute", 2), ("let go", 0, [3.0]), ("let go", 0, [4.0]),
                            ("let go", 1, [9.0])]
    assert all(s.sources is None for s in saved + [other]) and not any(checkpoint._UNSETTLED.values())

    fake.log.clear()
    monkeypatch.setattr(checkpoint, "_HOLD_BYTES", size - 1)
    big = layer(5)  # over the limit: to the allocator at once, never held
    assert fake.waits() == [("let go", 0, [5.0])] and big.sources is None
    monkeypatch.setattr(checkpoint, "_HOLD_BYTES", size)
    fake.log.clear()
    abandoned = layer(6)  # a step given up before its backward: its finalizer lets go
    assert abandoned.sources is not None
    del abandoned
    assert fake.waits() == [("let go", 0, [6.0])]
