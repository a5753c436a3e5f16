"""Every fixable broken fixture, once fixed, loads in real PEFT as the healthy adapter it came from."""
import pytest

torch = pytest.importorskip("torch", reason="reloading fixed adapters needs torch, transformers and PEFT (the [torch] extra)")
from adapter_doctor.fixers import FixOptions, apply, plan
from conftest import FIXTURES, broken, healthy, peft_logits

BASES = FIXTURES / "bases"
# broken fixture -> (healthy source, base, options, exact?)
CASES = {
    "keys-orig-mod": ("llama-lora", "llama", {}, True),
    "keys-module-prefix": ("llama-lora", "llama", {}, True),
    "keys-fsdp-prefix": ("llama-lora", "llama", {}, True),
    "keys-adapter-name": ("llama-lora", "llama", {"target_peft": "0.17.1"}, True),
    "keys-no-base-model-prefix": ("llama-lora", "llama", {}, True),
    "config-no-peft-type": ("llama-lora", "llama", {}, True),
    "config-legacy-keys": ("llama-lora", "llama", {"only": frozenset({"ADC203"})}, True),
    "base-revision-unsloth": ("llama-lora", "llama", {}, True),
    "base-abs-path-missing": ("llama-lora", "llama", {"set_base": "fixtures/bases/llama"}, True),
    "base-windows-path": ("llama-lora", "llama", {"set_base": "fixtures/bases/llama"}, True),
    "base-bnb-4bit": ("llama-lora", "llama", {"set_base": "fixtures/bases/llama"}, True),
    "base-none": ("llama-lora", "llama", {"set_base": "fixtures/bases/llama", "only": frozenset({"ADC307"})}, True),
    "keys-vlm-old-paths": ("v4/llava-lora", "llava", {"target_peft": "0.15.2"}, True),
    "values-fp32": ("llama-lora", "llama", {"only": frozenset({"ADC704"}), "dtype": "bf16"}, True),
}


def _fixed(tmp_path, source, options) -> tuple:
    p = plan(source, FixOptions(**options))
    assert not p.empty, p.refusals
    out = tmp_path / "fixed"
    result = apply(p, out=out, options=FixOptions(**options))
    return out, result


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_adapter_loads_like_its_healthy_source(tmp_path, name):
    source, base, options, exact = CASES[name]
    out, result = _fixed(tmp_path, broken(name), options)
    assert not {f.id for f in result.after.findings} & {c.finding for c in plan(broken(name), FixOptions(**options)).changes}
    fixed_logits, missing, unexpected = peft_logits(out, BASES / base)
    assert missing == [] and unexpected == []
    want, _, _ = peft_logits(healthy(source), BASES / base)
    assert torch.equal(fixed_logits, want) if exact else torch.allclose(fixed_logits, want, atol=1e-3)


def test_pickle_becomes_safetensors_with_equal_logits(tmp_path):
    out, result = _fixed(tmp_path, healthy("llama-lora-bin"), {})
    assert (out / "adapter_model.safetensors").exists() and not (out / "adapter_model.bin").exists()
    logits, missing, unexpected = peft_logits(out, BASES / "llama")
    assert missing == [] and unexpected == []
    assert torch.equal(logits, peft_logits(healthy("llama-lora-bin"), BASES / "llama")[0])


def test_fp32_cast_is_within_bf16_rounding(tmp_path):
    # Casting real fp32 training output rounds; compare with the fp32 original within bf16 precision.
    import json
    import shutil

    src = tmp_path / "fp32"
    shutil.copytree(broken("values-fp32"), src)
    from adapter_doctor.fixers.tensors import read_tensors, write_tensors

    tensors, meta = read_tensors(src / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for t in tensors.values():
        noise = torch.randn(t.shape, generator=gen) * 1e-3
        values = torch.frombuffer(bytearray(t.data), dtype=torch.float32).reshape(t.shape) + noise
        t.data = values.numpy().tobytes()
    write_tensors(src / "adapter_model.safetensors", tensors, meta)
    json.loads((src / "adapter_config.json").read_text())
    out, _ = _fixed(tmp_path, src, {"only": frozenset({"ADC704"}), "dtype": "bf16"})
    fixed, _, _ = peft_logits(out, BASES / "llama")
    original, _, _ = peft_logits(src, BASES / "llama")
    assert not torch.equal(fixed, original)
    assert torch.allclose(fixed, original, rtol=2e-2, atol=2e-2)


def test_v4_moe_adapter_fused_for_transformers_5(tmp_path):
    # PEFT 0.21.2 converts v4 mixtral adapters on load itself: the fixed file must load to the same LoRA.
    out, _ = _fixed(tmp_path, broken("keys-v4-moe-on-v5"), {"only": frozenset({"ADC514"})})
    logits, missing, unexpected = peft_logits(out, BASES / "mixtral")
    assert missing == [] and unexpected == []
    assert torch.equal(logits, peft_logits(healthy("v4/mixtral-per-expert"), BASES / "mixtral")[0])


def test_v5_moe_adapter_split_per_expert_for_transformers_4(tmp_path):
    out, _ = _fixed(tmp_path, healthy("qwen3moe-v5-target-parameters"), {"target_transformers": "4.57.6"})
    assert not any("target_parameters" in k and v for k, v in __import__("json").loads(
        (out / "adapter_config.json").read_text()).items())
    # Loaded here (transformers 5), PEFT fuses the per-expert adapter again: the model must compute the same.
    # Only the order of float32 sums may differ (bf16 products are exact in float32).
    logits, missing, unexpected = peft_logits(out, BASES / "qwen3_moe")
    assert missing == [] and unexpected == []
    original, _, _ = peft_logits(healthy("qwen3moe-v5-target-parameters"), BASES / "qwen3_moe")
    assert torch.allclose(logits, original, rtol=0, atol=1e-5)


def test_vlm_paths_round_trip_through_the_old_layout(tmp_path):
    from adapter_doctor.fixers.tensors import read_tensors

    old, _ = _fixed(tmp_path / "old", healthy("v4/llava-lora"), {"target_transformers": "4.51.3"})
    back, _ = _fixed(tmp_path / "new", old, {"target_peft": "0.15.2"})
    original, _ = read_tensors(healthy("v4/llava-lora") / "adapter_model.safetensors")
    restored, _ = read_tensors(back / "adapter_model.safetensors")
    assert {n: (t.shape, t.data) for n, t in restored.items()} == {n: (t.shape, t.data) for n, t in original.items()}
    assert torch.equal(peft_logits(back, BASES / "llava")[0], peft_logits(healthy("v4/llava-lora"), BASES / "llava")[0])


def test_a_pickle_swapped_after_planning_is_never_loaded(tmp_path, monkeypatch):
    import shutil

    import pytest
    from adapter_doctor.fixers import FixOptions, FixWriteError, apply, plan

    adapter = tmp_path / "a"
    shutil.copytree(healthy("llama-lora-bin"), adapter)
    p = plan(adapter, FixOptions(only=frozenset({"ADC423"})))
    assert p.weights is not None and p.weights.from_pickle
    sentinel = tmp_path / "ran"
    monkeypatch.setenv("SENTINEL", str(sentinel))
    # A live pickle: os.system touches the sentinel when anything unpickles it without an allow-list.
    payload = b'cos\nsystem\n(Vtouch "$SENTINEL"\ntR.'
    (adapter / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(FixWriteError, match="no longer passes the opcode scan"):
        apply(p, out=tmp_path / "out")
    assert not sentinel.exists() and not (tmp_path / "out" / "adapter_model.safetensors").exists()
