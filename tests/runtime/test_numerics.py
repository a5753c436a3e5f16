"""Patched against unpatched, on every supported architecture: logits, loss and every LoRA gradient.

Tolerances: logits and loss 1e-5, gradients 1e-4, each relative to the tensor's largest magnitude (fp32).
"""
import torch
from adapter_doctor.runtime import ensure_patched, unpatch

LOGITS, GRADS = 1e-5, 1e-4


def compare(tiny, model, ids, grad_of="lora_"):
    expected = tiny.run(model, ids, grad_of)
    report = ensure_patched(model)
    assert report.changed and not report.failures, report.failures
    got = tiny.run(model, ids, grad_of)
    assert tiny.rel(got[0], expected[0]) <= LOGITS
    assert tiny.rel(got[1], expected[1]) <= LOGITS
    assert got[2].keys() == expected[2].keys() and got[2]
    worst = max(tiny.rel(got[2][n], expected[2][n]) for n in expected[2])
    assert worst <= GRADS, worst
    return report


def test_lora_all_linear(tiny, arch_attn):
    arch, attn = arch_attn
    model = tiny.lora(tiny.base(arch, attn))
    report = compare(tiny, model, tiny.batch())
    prefix = type(model.get_base_model()).__name__.removesuffix("ForCausalLM")
    kinds = ("Attention", "MLP", "RMSNorm", "DecoderLayer", "ForCausalLM")
    assert set(report.counts) == {prefix + kind for kind in kinds}
    assert not report.fallbacks


def test_bf16_base_with_fp32_adapters(tiny, arch):
    # PEFT's default on a bf16 base: adapter weights upcast to fp32. Tolerance: one bf16 ulp at the largest value.
    model = tiny.lora(tiny.base(arch).to(torch.bfloat16))
    ids = tiny.batch()
    expected = tiny.run(model, ids)
    assert ensure_patched(model).changed
    got = tiny.run(model, ids)
    assert tiny.rel(got[0].float(), expected[0].float()) <= 2**-8
    assert max(tiny.rel(got[2][n], expected[2][n]) for n in expected[2]) <= 2**-8


def test_lora_with_lm_head_in_modules_to_save(tiny, arch):
    model = tiny.lora(tiny.base(arch), modules_to_save=["lm_head"])
    compare(tiny, model, tiny.batch(), grad_of="")  # every trainable parameter, the lm_head copy included
    assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())


def test_gradient_checkpointing_non_reentrant(tiny, arch):
    model = tiny.lora(tiny.base(arch))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compare(tiny, model, tiny.batch())


def test_greedy_generation_with_cache(tiny, arch):
    model = tiny.lora(tiny.base(arch))
    model.eval()
    prompt = tiny.batch(rows=2, length=5)
    settings = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(input_ids=prompt, **settings)
        ensure_patched(model)
        got = model.generate(input_ids=prompt, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        assert tiny.rel(a, b) <= LOGITS


def test_bare_transformers_model(tiny, arch):
    model = tiny.base(arch)
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)  # gradients for the norms: the path the patched RMSNorm computes
    ids = tiny.batch()
    expected = tiny.run(model, ids, grad_of="norm")
    assert ensure_patched(model).changed
    got = tiny.run(model, ids, grad_of="norm")
    assert tiny.rel(got[0], expected[0]) <= LOGITS
    assert max(tiny.rel(got[2][n], expected[2][n]) for n in expected[2]) <= GRADS


def test_peft_from_pretrained_trainable(tiny, arch, tmp_path):
    from peft import PeftModel

    tiny.base(arch).save_pretrained(tmp_path / "base")
    tiny.lora(tiny.base(arch)).save_pretrained(tmp_path / "adapter")
    base = type(tiny.base(arch)).from_pretrained(tmp_path / "base", attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True)
    compare(tiny, model, tiny.batch())


def counting_kernels(calls: dict):
    from dataclasses import replace

    from adapter_doctor.kernels import TORCH

    def counted(name):
        fn = getattr(TORCH, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    return replace(TORCH, name="counting", **{n: counted(n) for n in ("rms_norm", "rope", "swiglu", "geglu",
                                                                    "lora_linear", "lora_multi_linear",
                                                                    "linear_cross_entropy")})


def test_the_fused_kernels_are_the_ones_that_run(tiny, arch):
    calls = {}
    model = tiny.lora(tiny.base(arch))
    report = ensure_patched(model, kernels=counting_kernels(calls))
    assert report.kernels == "counting"
    model(input_ids=tiny.batch())
    layers = model.get_base_model().config.num_hidden_layers
    norms_per_layer = 4 if arch in ("gemma2", "gemma3_text") else 2
    assert calls["lora_multi_linear"] == 2 * layers  # q/k/v and gate/up, each group reading x once
    assert calls["lora_linear"] == 2 * layers  # o and down
    assert calls["rope"] == layers
    assert calls["rms_norm"] == norms_per_layer * layers + 1 + (2 * layers if arch in ("qwen3", "gemma3_text") else 0)
    activation = "geglu" if arch.startswith("gemma") else "swiglu"
    assert calls[activation] == layers
    unpatch(model)


def test_checkpointing_recomputes_the_patched_layers(tiny):
    calls = {}
    model = tiny.lora(tiny.base())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ensure_patched(model, kernels=counting_kernels(calls))
    model.train()
    loss = model(input_ids=tiny.batch(), labels=tiny.batch()).loss
    assert calls["rope"] == 2
    loss.backward()
    assert calls["rope"] == 4  # each decoder layer ran again, through our forward, for the backward pass


def test_hidden_states_and_attentions_are_still_recorded(tiny, arch):
    model = tiny.lora(tiny.base(arch))
    model.eval()
    ids = tiny.batch()
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
        ensure_patched(model)
        got = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    layers = model.get_base_model().config.num_hidden_layers
    assert len(got.hidden_states) == len(expected.hidden_states) == layers + 1
    assert len(got.attentions) == len(expected.attentions) == layers
    for a, b in zip(got.hidden_states + got.attentions, expected.hidden_states + expected.attentions):
        assert tiny.rel(a, b) <= LOGITS
