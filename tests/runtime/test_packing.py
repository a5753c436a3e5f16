"""Packed and padded batches against the per-document truth, on every supported architecture.

The truth is each document alone through the same model, with the token-weighted mean of their losses (each
document's first token is no target). Packed batches come from the real collators: transformers'
DataCollatorWithFlattening (position_ids only, or with the flash-attention keywords) and TRL's padding-free
collator. Tolerances as in test_numerics: loss 1e-5, gradients 1e-4, relative to the largest magnitude (fp32).
"""
import warnings

import pytest
import torch
from adapter_doctor.runtime import attach_packing_guard, ensure_patched, packing, return_logits
from adapter_doctor.runtime.document_attention import attend, by_flex, by_varlen, document_mask, flex_block_mask

LOSS, GRADS = 1e-5, 1e-4
LENGTHS = (50, 30, 48)  # the row: three documents in 128 tokens


def documents(lengths=LENGTHS, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (n,), generator=generator) for n in lengths]


def lora_grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}
    model.zero_grad(set_to_none=True)
    return grads


def truth(model, docs):
    """Loss and LoRA gradients of the documents one at a time, token-weighted."""
    model.train()
    total, targets = 0.0, 0
    for doc in docs:
        total = total + model(input_ids=doc[None], labels=doc[None]).loss * (len(doc) - 1)
        targets += len(doc) - 1
    loss = total / targets
    loss.backward()
    return loss.detach(), lora_grads(model)


def step(model, batch):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def worst(tiny, got, expected):
    assert got.keys() == expected.keys() and got
    return max(tiny.rel(got[n], expected[n]) for n in expected)


def collate(kind, docs):
    features = [{"input_ids": d.tolist()} for d in docs]
    if kind == "flattening":
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening()(features)
    if kind == "flattening-varlen":
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    trl = pytest.importorskip("trl.trainer.sft_trainer", reason="TRL's collator needs TRL (the [torch] extra)")
    return trl.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(features)


def trl_release() -> tuple[int, int]:
    import trl

    return tuple(int(part) for part in trl.__version__.split(".")[:2])


def test_the_collators_ignore_each_documents_first_target():
    """What the collators hand over. TRL 0.23 (the release Unsloth 2025.11 installs) leaves each document's
    first target in, beside an attention mask of ones: the runtime ignores those targets itself
    (`test_every_collator_and_cache_setting` passes on it). TRL adds `cu_seq_lens_*` from 1.16."""
    docs = documents()
    starts = torch.tensor([0, 50, 80])
    for kind in ("flattening", "flattening-varlen", "trl"):
        batch = collate(kind, docs)
        old_trl = kind == "trl" and trl_release() < (0, 24)
        if old_trl:
            assert torch.equal(batch["labels"][0], batch["input_ids"][0]) and bool(batch["attention_mask"].eq(1).all())
        else:
            assert (batch["labels"][0, starts] == -100).all(), kind
            assert (batch["labels"][0] != -100).sum() == sum(LENGTHS) - 3
            assert "attention_mask" not in batch
        assert batch["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert ({"cu_seq_lens_q", "max_length_q"} <= set(collate("trl", docs))) == (trl_release() >= (1, 16))


def test_packed_batch_equals_the_documents_alone(tiny, arch_attn):
    arch, attn = arch_attn
    model = tiny.lora(tiny.base(arch, attn))
    docs = documents()
    expected_loss, expected = truth(model, docs)
    ensure_patched(model)
    assert tiny.rel(truth(model, docs)[0], expected_loss) <= LOSS  # patched, one document at a time
    # transformers 5 makes a cache by default (config.use_cache), the case in which the library's own mask spans
    # the whole row; a packed batch must not depend on it
    loss, grads = step(model, collate("flattening", docs))
    assert tiny.rel(loss, expected_loss) <= LOSS, (float(loss), float(expected_loss))
    assert worst(tiny, grads, expected) <= GRADS


@pytest.mark.parametrize("kind", ["flattening-varlen", "trl"])
@pytest.mark.parametrize("use_cache", [None, False])
def test_every_collator_and_cache_setting(tiny, kind, use_cache):
    model = tiny.lora(tiny.base("qwen3", "sdpa"))
    docs = documents()
    expected_loss, expected = truth(model, docs)
    ensure_patched(model)
    batch = {**collate(kind, docs), "use_cache": use_cache}  # TRL's seq_idx too, as its trainer passes it
    loss, grads = step(model, batch)
    assert tiny.rel(loss, expected_loss) <= LOSS
    assert worst(tiny, grads, expected) <= GRADS


def test_several_packed_rows_and_targets_left_across_boundaries(tiny):
    # Two rows of two documents each, from position_ids alone, with labels = input_ids: the runtime ignores the
    # targets that would cross a boundary itself
    model = tiny.lora(tiny.base("mistral", "sdpa"))
    docs = documents((20, 12, 9, 23))
    expected_loss, expected = truth(model, docs)
    ensure_patched(model)
    ids = torch.stack([torch.cat(docs[:2]), torch.cat(docs[2:])])
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(12)]),
                             torch.cat([torch.arange(9), torch.arange(23)])])
    loss, grads = step(model, {"input_ids": ids, "labels": ids.clone(), "position_ids": positions})
    assert tiny.rel(loss, expected_loss) <= LOSS
    assert worst(tiny, grads, expected) <= GRADS


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_the_rows_alone(tiny, arch_attn, side):
    arch, attn = arch_attn
    model = tiny.lora(tiny.base(arch, attn))
    docs = documents((21, 13))
    expected_loss, expected = truth(model, docs)
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        where = slice(width - len(doc), width) if side == "left" else slice(0, len(doc))
        ids[row, where], mask[row, where] = doc, 1
    labels = ids.masked_fill(mask == 0, -100)
    if side == "left":  # the last pad would be trained to predict each row's first token
        labels[torch.arange(len(docs)), width - torch.tensor([len(d) for d in docs])] = -100
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
    ensure_patched(model)
    loss, grads = step(model, batch)
    assert tiny.rel(loss, expected_loss) <= LOSS, (float(loss), float(expected_loss))
    assert worst(tiny, grads, expected) <= GRADS


def test_what_transformers_does_with_a_packed_row(tiny):
    """The facts the warning rests on (transformers 5.24): with no cache the library's SDPA keeps the documents
    apart, with the default cache it does not, and `problems` says which is which."""
    model = tiny.lora(tiny.base("llama", "sdpa"))
    docs = documents()
    expected_loss, _ = truth(model, docs)
    batch = collate("flattening", docs)
    with torch.no_grad():
        model.train()
        crossing = model(**batch).loss
        apart = model(**batch, use_cache=False).loss
    assert tiny.rel(apart, expected_loss) <= LOSS
    assert tiny.rel(crossing, expected_loss) > 1e-3
    found = packing.problems(model, batch)
    assert {p.cls for p in found} == {"LlamaAttention"} and len(found) == 2
    assert "use_cache" in found[0].why and "ensure_patched" in found[0].fix
    assert packing.problems(model, {**batch, "use_cache": False}) == []
    masked = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    assert "attention mask" in packing.problems(model, {**masked, "use_cache": False})[0].why
    unmasked_labels = {**batch, "labels": batch["input_ids"].clone(), "use_cache": False}
    assert [p.cls for p in packing.problems(model, unmasked_labels)] == ["labels"]


def test_guard_warns_once_and_only_when_documents_would_mix(tiny):
    model = tiny.lora(tiny.base("llama", "sdpa"))
    batch = collate("flattening", documents())
    handle = attach_packing_guard(model)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(**batch, use_cache=False)  # the library keeps them apart: silent
            model(**batch)
            model(**batch)
    found = [w for w in caught if issubclass(w.category, packing.PackingWarning)]
    assert len(found) == 1
    message = str(found[0].message)
    assert "LlamaAttention" in message and "model.layers.0.self_attn" in message and "use_cache=False" in message
    handle.remove()


def test_patched_model_warns_about_an_attention_it_left_unpatched(tiny):
    model = tiny.lora(tiny.base("llama", "sdpa"))
    ensure_patched(model)
    attention = model.get_base_model().model.layers[1].self_attn
    attention.__class__ = attention._adapter_doctor_patch.original  # as if that layer could not be patched
    batch = collate("flattening", documents())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(model, batch)
        step(model, batch)
    found = [w for w in caught if issubclass(w.category, packing.PackingWarning)]
    assert len(found) == 1 and "model.layers.1.self_attn" in str(found[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model2 = tiny.lora(tiny.base("llama", "sdpa"))
        ensure_patched(model2)
        step(model2, batch)
    assert not [w for w in caught if issubclass(w.category, packing.PackingWarning)]


def test_inspect_model_with_a_batch(tiny):
    from adapter_doctor import inspect_model

    model = tiny.lora(tiny.base("llama", "sdpa"))
    model.train()
    batch = collate("flattening", documents())
    ids = [f.id for f in inspect_model(model, batch=batch).targets[0].findings]
    assert "ADC910" in ids
    assert "ADC910" not in [f.id for f in inspect_model(model, batch={**batch, "use_cache": False}).targets[0].findings]
    ensure_patched(model)
    assert "ADC910" not in [f.id for f in inspect_model(model, batch=batch).targets[0].findings]


def test_find_documents():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    ids = torch.zeros_like(positions)
    found = packing.find_documents({"input_ids": ids, "position_ids": positions})
    assert found.cu_seq_lens.tolist() == [0, 3, 5, 9] and found.max_length == 4
    assert packing.find_documents({"input_ids": ids, "position_ids": torch.arange(9)[None]}) is None
    assert packing.find_documents({"input_ids": ids, "position_ids": positions,
                                   "attention_mask": torch.tensor([[0] + [1] * 8])}) is None  # padded: the mask rules
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    from_cu = packing.find_documents({"input_ids": ids, "cu_seq_lens_q": cu})
    assert from_cu.position_ids.tolist() == positions.tolist()  # positions restart even when only cu is given
    rows = packing.find_documents({"input_ids": torch.zeros(2, 4), "position_ids": torch.tensor([[0, 1, 0, 1],
                                                                                                 [0, 1, 2, 3]])})
    assert rows.cu_seq_lens.tolist() == [0, 2, 4, 8]


def test_document_mask_counts_the_window_within_each_document():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    mask = document_mask(cu, 1, 7, window=2)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False]  # its doc starts at 3
    assert mask[6].tolist() == [False] * 5 + [True, True]
    assert not mask[3, :3].any()


def test_mask_path_against_one_sdpa_per_document():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 12, 8, generator=generator) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True

    out, _ = attend(Module(), q, k, v, cu, None, implementation="sdpa", eager=None, scaling=0.3, dropout=0.0,
                    window=None, softcap=None, kwargs={})
    for a, b in ((0, 5), (5, 12)):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b].repeat_interleave(2, 1), v[:, :, a:b].repeat_interleave(2, 1),
            is_causal=True, scale=0.3)
        assert torch.allclose(out[:, a:b], alone.transpose(1, 2), atol=1e-6)


def test_logits_are_none_in_training_unless_asked_for(tiny):
    model = tiny.lora(tiny.base("llama"))
    ids = tiny.batch()
    model.train()
    expected = model(input_ids=ids, labels=ids)
    ensure_patched(model)
    fused = model(input_ids=ids, labels=ids)
    assert fused.logits is None and tiny.rel(fused.loss, expected.loss) <= LOSS
    assert return_logits(model) == 1
    kept = model(input_ids=ids, labels=ids)
    assert kept.logits is not None and tiny.rel(kept.logits, expected.logits) <= LOSS
    assert tiny.rel(kept.loss, expected.loss) <= LOSS
    assert return_logits(model, False) == 1 and model(input_ids=ids, labels=ids).logits is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_fast_backends_against_the_mask_path(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 1000, 64, generator=generator, device="cuda", dtype=torch.bfloat16)
               for h in (8, 2, 2))
    cu = torch.tensor([0, 300, 310, 1000], dtype=torch.int32, device="cuda")

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal = 4, True

    for window in (None, 64):
        ref, _ = attend(Module(), q.float(), k.float(), v.float(), cu, 690, implementation="sdpa", eager=None,
                        scaling=0.125, dropout=0.0, window=window, softcap=None, kwargs={}, backend="mask")
        if backend == "varlen":
            out = by_varlen(q, k, v, cu, 690, scaling=0.125, window=window)
        else:
            out = by_flex(q, k, v, flex_block_mask(cu, 1, 1000, window), scaling=0.125, softcap=None)
        assert out is not None, f"{backend} cannot run here"
        assert (out.float() - ref).abs().max() <= 2e-2


def test_packed_batch_with_gradient_checkpointing(tiny):
    model = tiny.lora(tiny.base("gemma3_text", "sdpa"))
    docs = documents()
    expected_loss, expected = truth(model, docs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ensure_patched(model)
    loss, grads = step(model, collate("trl", docs))
    assert tiny.rel(loss, expected_loss) <= LOSS
    assert worst(tiny, grads, expected) <= GRADS


def _caught_packing(caught):
    return [str(w.message) for w in caught if issubclass(w.category, packing.PackingWarning)]


def test_softcapping_on_the_mask_path_is_applied_or_refused_never_dropped():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    generator = torch.Generator().manual_seed(3)
    q, k, v = (3 * torch.randn(1, 2, 10, 8, generator=generator) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal = 1, True

    options = dict(implementation="sdpa", scaling=0.3, dropout=0.0, window=None, kwargs={})
    out, _ = attend(Module(), q, k, v, cu, None, eager=eager_attention_forward, softcap=2.0, **options)
    scores = torch.tanh(q @ k.transpose(-1, -2) * 0.3 / 2.0) * 2.0  # Gemma 2's cap, by hand
    scores = scores.masked_fill(~document_mask(cu, 1, 10), float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    uncapped, _ = attend(Module(), q, k, v, cu, None, eager=eager_attention_forward, softcap=None, **options)
    assert not torch.allclose(uncapped, expected, atol=1e-3)  # the cap changes this output
    with pytest.raises(ValueError, match="softcapping"):  # SDPA has no softcap: refused, not ignored
        attend(Module(), q, k, v, cu, None, eager=None, softcap=2.0, **options)


def tiny_llava():
    """A Llava of a Siglip vision tower and a Llama decoder, from real transformers classes."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=8)
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=127)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").float()


def test_a_vision_towers_attention_is_no_packing_problem():
    model = tiny_llava()
    vision = [p for p, m in model.named_modules() if type(m).__name__ == "SiglipAttention"]
    assert len(vision) == 2 and all(hasattr(m, "q_proj") for m in model.modules() if type(m).__name__ == "SiglipAttention")
    model.train()
    batch = collate("flattening", documents())
    found = packing.problems(model, batch)  # the decoder makes a cache: its attention mixes the documents
    assert {p.cls for p in found} == {"LlamaAttention"} and len(found) == 2
    assert all("language_model" in p.path for p in found)
    assert packing.problems(model, {**batch, "use_cache": False}) == []
    handle = attach_packing_guard(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(**batch, use_cache=False)
            model(**batch)
    handle.remove()
    messages = _caught_packing(caught)
    assert len(messages) == 1 and "LlamaAttention" in messages[0] and "Siglip" not in messages[0]


def _guarded_forwards(model, batch, *settings):
    """The PackingWarnings of one forward per (use_cache argument, grad enabled), in order, under a guard."""
    handle = attach_packing_guard(model)
    out = []
    for use_cache, grad in settings:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.set_grad_enabled(grad):
                model(**batch, **({} if use_cache is None else {"use_cache": use_cache}))
        out.append(len(_caught_packing(caught)))
    handle.remove()
    return out


def test_guard_follows_a_later_unpatch_and_the_configs_use_cache(tiny):
    from adapter_doctor.runtime import unpatch

    batch = collate("flattening", documents())
    model = tiny.lora(tiny.base("llama", "sdpa"))
    model.train()
    ensure_patched(model)
    handle = attach_packing_guard(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(**batch)  # patched: documents apart, silent
            assert not _caught_packing(caught)
            unpatch(model)
            model(**batch)  # the library's attention again, with the default cache: it mixes them
    handle.remove()
    assert len(_caught_packing(caught)) == 1
    model = tiny.lora(tiny.base("llama", "sdpa"))
    model.train()
    model.get_base_model().config.use_cache = False
    assert _guarded_forwards(model, batch, (None, False)) == [0]
    model.get_base_model().config.use_cache = True  # the same batch now makes a cache
    assert _guarded_forwards(model, batch, (None, False)) == [1]


def test_guard_follows_gradient_checkpointing_and_grad_mode(tiny):
    # transformers turns the cache off under checkpointing only while training with gradients
    batch = collate("flattening", documents())
    model = tiny.lora(tiny.base("llama", "sdpa"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert _guarded_forwards(model, batch, (None, True), (None, True), (None, False)) == [0, 0, 1]


def test_guard_checks_each_kind_of_batch_once_without_walking_the_model_again(tiny, monkeypatch):
    model = tiny.lora(tiny.base("llama", "sdpa"))
    model.train()
    batch = collate("flattening", documents())
    walks, checks = [], []
    named_modules, problems = torch.nn.Module.named_modules, packing.problems
    monkeypatch.setattr(torch.nn.Module, "named_modules", lambda self, *a, **k: walks.append(1) or named_modules(
        self, *a, **k))
    monkeypatch.setattr(packing, "problems", lambda *a, **k: checks.append(1) or problems(*a, **k))

    def walks_in_a_forward(**extra):
        walks.clear()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model(**batch, **extra)
        return len(walks)

    bare, bare_cached = walks_in_a_forward(use_cache=False), walks_in_a_forward()  # what the forward walks itself
    handle = attach_packing_guard(model)
    assert walks_in_a_forward(use_cache=False) > bare and len(checks) == 1
    assert [walks_in_a_forward(use_cache=False) for _ in range(3)] == [bare] * 3 and len(checks) == 1
    walks_in_a_forward()  # another kind: the forward makes a cache
    assert len(checks) == 2
    assert walks_in_a_forward() == bare_cached and len(checks) == 2
    model.get_base_model().config._attn_implementation = "eager"  # another attention: checked again
    walks_in_a_forward()
    assert len(checks) == 3
    handle.remove()


def test_the_probe_of_the_library_answers_as_its_release_masks_rows_of_one_document():
    """transformers 4.57's check for packed sequences answers with a tensor even for rows of one document each,
    so it builds SDPA a full causal mask there; 5.x answers None and builds none."""
    import transformers

    expected = int(transformers.__version__.split(".")[0]) < 5
    assert packing._library_masks_single_documents() is expected


def test_the_probe_under_fake_tensors_answers_no_and_keeps_nothing(monkeypatch):
    """Under FakeTensorMode the library's check cannot answer for the library: no mask, and the next call
    outside the mode still asks it."""
    import transformers
    import transformers.masking_utils as masking_utils
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(packing, "_PROBED", [])
    real = packing._library_masks_single_documents
    with FakeTensorMode():
        assert real() is False
    assert packing._PROBED == []
    asked = []
    check = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: asked.append(p) or check(p))
    expected = int(transformers.__version__.split(".")[0]) < 5
    assert real() is expected and len(asked) == 1 and packing._PROBED == [expected]


@pytest.mark.parametrize("attn,extra,wanted", [
    ("sdpa", {}, True),
    ("eager", {}, False),  # eager builds its mask either way
    ("flash_attention_2", {}, False),  # flash-attention would unpad for a mask
    ("sdpa", {"attention_mask": torch.ones(2, 13, dtype=torch.long)}, False),  # the user's mask stays
    ("sdpa", {"past_key_values": object()}, False),  # a cache: the library sizes the mask from it
    ("sdpa", {"cache_position": torch.arange(13)}, False),  # positions of the caller's: left as they are
])
def test_a_mask_of_ones_is_given_only_where_the_library_would_build_a_causal_one(tiny, monkeypatch, attn, extra,
                                                                                 wanted):
    model = tiny.base("llama", attn="sdpa")
    model.config._attn_implementation = attn
    batch = {"input_ids": tiny.batch(), **extra}
    monkeypatch.setattr(packing, "_library_masks_single_documents", lambda: True)
    ones = packing.causal_mask_of_ones(model, batch)
    assert (ones is not None) is wanted
    if wanted:
        assert ones.shape == batch["input_ids"].shape and bool(ones.eq(1).all())
    monkeypatch.setattr(packing, "_library_masks_single_documents", lambda: False)
    assert packing.causal_mask_of_ones(model, batch) is None  # transformers 5: nothing to add


def test_a_mask_of_ones_follows_inputs_embeds_and_is_never_given_while_tracing(tiny, monkeypatch):
    model = tiny.base("llama", attn="sdpa")
    monkeypatch.setattr(packing, "_library_masks_single_documents", lambda: True)
    embeds = torch.zeros(3, 5, model.config.hidden_size)
    ones = packing.causal_mask_of_ones(model, {"inputs_embeds": embeds})
    assert ones.shape == (3, 5) and ones.device == embeds.device
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert packing.causal_mask_of_ones(model, {"inputs_embeds": embeds}) is None


def test_no_mask_of_ones_for_cuda_tokens_while_the_stream_captures(tiny, monkeypatch):
    """The capture check on the CPU: fake CUDA tokens, and the capture state as torch.cuda would report it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = tiny.base("llama", attn="sdpa")
    monkeypatch.setattr(packing, "_library_masks_single_documents", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with FakeTensorMode():
        batch = {"input_ids": torch.empty(2, 5, dtype=torch.long, device="cuda")}
        for capturing in (False, True):
            monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda state=capturing: state)
            assert (packing.causal_mask_of_ones(model, batch) is None) is capturing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_mask_of_ones_while_a_cuda_graph_captures(tiny, monkeypatch):
    """transformers 4.57 reads a mask's values on the host (`mask.all()`), which a capture forbids; with no
    mask it builds its own without reading any."""
    model = tiny.base("llama", attn="sdpa")
    monkeypatch.setattr(packing, "_library_masks_single_documents", lambda: True)
    batch = {"input_ids": tiny.batch().cuda()}
    assert packing.causal_mask_of_ones(model, batch) is not None
    found = []
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        found.append(packing.causal_mask_of_ones(model, batch))
        torch.zeros(1, device="cuda").add_(1)  # a graph with one node
    assert found[0] is None
