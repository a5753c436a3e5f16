"""The attention a checkpointed layer records in its forward, so that its replay runs neither the q/k/v GEMMs
nor RoPE nor the attention: the same values and gradients as SDPA after RoPE, and the same training."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from adapter_doctor.kernels import TORCH, lora_linear, rope_reference
from adapter_doctor.runtime import ensure_patched, host_plan, saved_attention
from adapter_doctor.runtime.checkpoint import enable_offloaded_checkpointing
from adapter_doctor.runtime.tape import Layout, Tape

# The references everywhere but the fused gradient-only projections, which run on any device.
SKIPPING = dataclasses.replace(TORCH, name="torch+gradient-only",
                               lora_linear_gradient_only=lora_linear.lora_linear_gradient_only)
B, S, D = 2, 9, 16


def rotary(seq=S, dim=D):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.outer(torch.arange(seq).float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)[None]
    return emb.cos(), emb.sin()


def plain(scale, dim=D):
    """The keywords of a call that records: causal SDPA over whole rows, RoPE over the whole head."""
    return dict(scale=scale, implementation="sdpa", mask=None, cache=None, dropout=0.0, packed=False, causal=True,
                extra={}, norms_in_the_way=False, rotary=dim)


def heads(t, n):
    return t.view(B, S, n, D).transpose(1, 2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (6, 1)])
def test_the_replay_has_the_value_and_gradients_of_sdpa_after_rope_without_reading_q_k_v(dtype, tol, n_heads, n_kv):
    torch.manual_seed(0)
    cos, sin = (t.to(dtype) for t in rotary())
    q, k, v = (torch.randn(B, S, n * D, dtype=dtype, requires_grad=True) for n in (n_heads, n_kv, n_kv))
    scale, grad = 0.3, torch.randn(B, S, n_heads * D, dtype=dtype)

    query, key = rope_reference(heads(q, n_heads), heads(k, n_kv), cos, sin)
    want = F.scaled_dot_product_attention(query, key, heads(v, n_kv), is_causal=True, scale=scale, enable_gqa=True)
    want = want.transpose(1, 2).reshape(B, S, -1)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)

    with torch.no_grad():  # laid out as the projections lay them out: [batch, seq, heads, dim] underneath
        query, key = (t.transpose(1, 2).contiguous().transpose(1, 2)
                      for t in rope_reference(heads(q, n_heads), heads(k, n_kv), cos, sin))
        operator = saved_attention.backend(query, key, heads(v, n_kv), **plain(scale))
        out, kept = saved_attention.record(operator, query, key, heads(v, n_kv), scale)
    assert operator == "flash" and len(kept) == saved_attention.COUNT and all(t.is_contiguous() for t in kept[:4])  # kept without copies
    assert torch.allclose(out.reshape(B, S, -1), want, atol=tol, rtol=tol)
    # Placeholders of the projections' outputs: the replay must not read them
    placeholders = [torch.full_like(t, float("nan")).requires_grad_() for t in (q, k, v)]
    got = saved_attention.replay(*placeholders, cos, sin, scale, rope_reference, operator, kept)
    assert torch.equal(got, out.reshape(B, S, -1))
    got_grads = torch.autograd.grad(got, placeholders, grad)
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert float((g - w).float().norm() / w.float().norm()) < tol


def test_what_is_recorded_and_what_runs_again():
    q, k = torch.zeros(B, 4, S, D), torch.zeros(B, 2, S, D)
    call = plain(0.3)
    assert saved_attention.backend(q, k, k, **call) == "flash"  # the CPU's flash kernel, as SDPA picks it
    for change in [dict(implementation="eager"), dict(implementation="flash_attention_2"),
                   dict(mask=torch.zeros(1)), dict(cache=object()), dict(dropout=0.1), dict(packed=True),
                   dict(causal=False), dict(extra={"sliding_window": 8}), dict(extra={"softcap": 50.0}),
                   dict(norms_in_the_way=True), dict(rotary=D // 2)]:
        assert saved_attention.backend(q, k, k, **{**call, **change}) is None, change
    assert saved_attention.backend(q, k, k, **{**call, "extra": {"sliding_window": None}}) == "flash"
    assert saved_attention.backend(q, torch.zeros(B, 3, S, D), k, **call) is None  # 4 heads do not group by 3
    assert saved_attention.backend(q[:, :, :1], k[:, :, :1], k, **call) is None  # one token: not causal SDPA
    assert saved_attention.backend(q.int(), k.int(), k, **call) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert saved_attention.backend(q, k, k, **call) is None


def test_a_replay_tape_hands_each_attention_call_its_own_tensors():
    kept = [torch.tensor(i) for i in range(11)]  # one sum, then two calls' five tensors
    calls = ((5, "flash"), (0, ""), (5, "cudnn"))
    tape = Tape.replaying(kept, Layout({}, 1, calls))
    assert tape.sums == kept[:1]
    first, second, third = tape.next_attention(), tape.next_attention(), tape.next_attention()
    assert first == (kept[1:6], "flash") and second is None and third == (kept[6:11], "cudnn")
    assert tape.next_attention() is None
    without = Tape.replaying(kept[:1], Layout({}, 1, calls))  # the attention's tensors were not kept
    assert without.next_attention() is None


def grads(model, ids):
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


MODELS = {  # arch, overrides, how many of its two layers record their attention
    "llama": ("llama", {}, 2),
    "mistral": ("mistral", {}, 0),  # a window of 8 over 13 tokens
    "qwen3": ("qwen3", {}, 2),  # q/k norms between the projections and RoPE: kept before them
    "phi3-whole-rotary": ("phi3", {"partial_rotary_factor": 1.0, "sliding_window": None}, 2),  # fused qkv_proj
    "phi3": ("phi3", {}, 0),  # half the head rotates
    "gemma3": ("gemma3_text", {}, 1),  # q/k norms too; its first layer has a window
    "gemma": ("gemma", {}, 2),
    "qwen2": ("qwen2", {}, 1),  # its first layer has a window of 8
}


@pytest.mark.parametrize("kernels", [TORCH, SKIPPING], ids=["torch", "gradient-only"])
@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointed_layers_that_record_their_attention_train_as_plain_layers(tiny, monkeypatch, name, kernels):
    arch, overrides, records = MODELS[name]

    def model():
        m = tiny.lora(tiny.base(arch, attn="sdpa", **overrides))
        generator = torch.Generator().manual_seed(1)
        for name, p in m.named_parameters():  # q/k norms unlike each other and unlike ones, as trained ones are
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.data.uniform_(0.5, 1.5, generator=generator)
        return m

    ids = tiny.batch()
    expected = grads(model(), ids)
    patched = model()
    ensure_patched(patched, kernels=kernels)
    assert enable_offloaded_checkpointing(patched) == 2
    calls = {"record": 0, "sdpa": 0}
    real_record, real_sdpa = saved_attention.record, F.scaled_dot_product_attention

    def counting(what, real):
        return lambda *a, **k: calls.__setitem__(what, calls[what] + 1) or real(*a, **k)

    monkeypatch.setattr(saved_attention, "record", counting("record", real_record))
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting("sdpa", real_sdpa))
    patched.train()
    loss = patched(input_ids=ids, labels=ids).loss
    assert calls == {"record": records, "sdpa": 2 - records}
    loss.backward()
    assert calls["sdpa"] == 2 * (2 - records)  # a recorded attention is not computed again in the replay
    got = {n: p.grad for n, p in patched.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for n, g in expected.items():
        assert torch.allclose(got[n], g, rtol=1e-4, atol=1e-6), n


def test_the_replay_of_a_recorded_attention_runs_no_projection_gemm_but_the_mlps(tiny, monkeypatch):
    model = tiny.lora(tiny.base("llama", attn="sdpa"))
    ensure_patched(model, kernels=SKIPPING)
    enable_offloaded_checkpointing(model)
    names = {m.base_layer.weight.data_ptr(): name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if name.endswith("_proj") and hasattr(m, "base_layer")}
    used = []
    real = F.linear
    ids = tiny.batch()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: used.append(names.get(w.data_ptr())) or real(x, w, b))
    loss.backward()
    replayed = ["gate_proj", "up_proj"]
    assert sorted(n for n in used if n) == sorted(replayed * 2)  # per layer: the MLP's inputs (and q/k/v's)


def train_the_norms(model):
    for name, p in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.requires_grad_(True)


def norms_that_hand_back_their_input(model):
    for layer in model.get_base_model().model.layers:
        layer.self_attn.q_norm, layer.self_attn.k_norm = torch.nn.Identity(), torch.nn.Identity()


@pytest.mark.parametrize("change", [train_the_norms, norms_that_hand_back_their_input])
def test_q_k_norms_in_the_way_keep_the_replay(tiny, monkeypatch, change):
    """The recorded attention's backward hands gradients to q, k and v only, so where the q/k norms' own weights
    train the layer records nothing and its replay runs the attention again, and they get theirs; a norm that
    returns its input's storage would let RoPE rotate the tensors recorded before it, so it records nothing
    either. Both train as plain layers."""
    def model():
        m = tiny.lora(tiny.base("qwen3", attn="sdpa"))
        change(m)
        return m

    ids = tiny.batch()
    expected = grads(model(), ids)
    assert any("q_norm" in n for n in expected) == (change is train_the_norms)
    patched = model()
    ensure_patched(patched)
    enable_offloaded_checkpointing(patched)
    recorded = []
    real = saved_attention.record
    monkeypatch.setattr(saved_attention, "record", lambda *a, **k: recorded.append(1) or real(*a, **k))
    got = grads(patched, ids)
    assert not recorded and got.keys() == expected.keys()
    for n, g in expected.items():
        assert torch.allclose(got[n], g, rtol=1e-4, atol=1e-6), n


def test_where_the_host_holds_the_sums_but_not_the_attention_the_replay_runs_it(tiny, monkeypatch):
    ids = tiny.batch()
    expected = grads(tiny.lora(tiny.base("llama", attn="sdpa")), ids)
    model = tiny.lora(tiny.base("llama", attn="sdpa"))
    ensure_patched(model)
    # Each layer's input and sum: 2x13x64 fp32, pinned as 8,192 bytes each; the attention's tensors are more.
    enable_offloaded_checkpointing(model, host_memory_gib=4 * 8192 / 2**30)
    sdpa = []
    real = F.scaled_dot_product_attention
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa.append(1) or real(*a, **k))
    loss.backward()
    plan = host_plan(model)
    assert (plan.layers_offloaded, plan.layers_without_attention, plan.layers_input_only) == (0, 2, 0)
    assert len(sdpa) == 2
    for n, g in expected.items():
        assert torch.allclose(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (32, 8)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_replay_has_the_gradients_of_flash_sdpa_with_the_triton_rope(n_heads, n_kv):
    from adapter_doctor.kernels import kernel_set

    rope = kernel_set("triton").rope
    torch.manual_seed(0)
    b, s, d = 2, 384, 128
    inv_freq = 1.0 / 500000 ** (torch.arange(0, d, 2, device="cuda").float() / d)
    angles = torch.outer(torch.arange(s, device="cuda").float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)[None]
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    q, k, v = (torch.randn(b, s, n * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n in (n_heads, n_kv, n_kv))
    scale, grad = d ** -0.5, torch.randn(b, s, n_heads * d, device="cuda", dtype=torch.bfloat16)

    def split(t, n):
        return t.view(b, s, n, d).transpose(1, 2)

    query, key = rope(split(q, n_heads).clone(), split(k, n_kv).clone(), cos, sin)
    want = F.scaled_dot_product_attention(query, key, split(v, n_kv), is_causal=True, scale=scale, enable_gqa=True)
    want = want.transpose(1, 2).reshape(b, s, -1)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    with torch.no_grad():
        query, key = rope(split(q, n_heads).detach().clone(), split(k, n_kv).detach().clone(), cos, sin)
        operator = saved_attention.backend(query, key, split(v, n_kv), **plain(scale, d))
        out, kept = saved_attention.record(operator, query, key, split(v, n_kv).detach(), scale)
    assert operator in ("flash", "cudnn")
    assert torch.equal(out.reshape(b, s, -1), want)  # the operator SDPA itself runs here
    placeholders = [torch.full_like(t, float("nan")).requires_grad_() for t in (q, k, v)]
    got = saved_attention.replay(*placeholders, cos, sin, scale, rope, operator, kept)
    for g, w in zip(torch.autograd.grad(got, placeholders, grad), want_grads):
        assert float((g - w).float().norm() / w.float().norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])  # qwen3: kept before its q/k norms
def test_on_the_gpu_layers_that_record_their_attention_train_as_layers_that_recompute_it(tiny, monkeypatch,
                                                                                         model_type):
    ids = [tiny.batch(seed=s).cuda() for s in range(4)]

    def train(record: bool):
        if not record:
            monkeypatch.setattr(saved_attention, "backend", lambda *a, **k: None)
        recorded = []
        real = saved_attention.record
        monkeypatch.setattr(saved_attention, "record", lambda *a: recorded.append(1) or real(*a))
        model = tiny.lora(tiny.base(model_type, attn="sdpa", num_hidden_layers=3)).cuda().to(torch.bfloat16)
        ensure_patched(model)
        enable_offloaded_checkpointing(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        losses = []
        for batch in ids:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        monkeypatch.undo()
        assert len(recorded) == (3 * len(ids) if record else 0)
        return torch.stack(losses), {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}

    (want, want_weights), (got, got_weights) = train(False), train(True)
    assert torch.allclose(got, want, rtol=1e-3, atol=0), (got, want)
    for name, w in want_weights.items():
        assert float((got_weights[name] - w).norm() / w.norm()) < 1e-2, name
