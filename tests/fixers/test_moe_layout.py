"""MoE LoRA layout conversion: exact on the stored values, and the same model through real PEFT.

The dense checks read both adapters the way PEFT applies them (nn.Linear LoRA per expert in transformers
4; ParamWrapper on the fused parameters in transformers 5) and compare every expert's scale * B @ A in
float64. Those products are exact: a bf16 x bf16 product has at most 16 significant bits, and sums of a
few of them at the magnitudes of these adapters fit in float64's 53, so conversions must match bit for bit.
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from adapter_doctor.fixers.moe_layout import LayoutRefusal, fused_to_per_expert, per_expert_to_fused
from adapter_doctor.fixers.tensors import RawTensor, read_tensors, write_tensors
from conftest import FIXTURES, healthy

MIXTRAL_V4, QWEN_V5 = healthy("v4/mixtral-per-expert"), healthy("qwen3moe-v5-target-parameters")
MIXTRAL, QWEN = FIXTURES / "bases" / "mixtral", FIXTURES / "bases" / "qwen3_moe"
ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
L0 = "base_model.model.model.layers.0."


def adapter(path: Path) -> tuple[dict[str, RawTensor], dict]:
    return read_tensors(path / "adapter_model.safetensors")[0], json.loads((path / "adapter_config.json").read_text())


def base_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def save(folder: Path, tensors: dict[str, RawTensor], config: dict) -> Path:
    folder.mkdir(parents=True)
    write_tensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def values(t: RawTensor) -> np.ndarray:
    if t.dtype == "BF16":
        bits = np.frombuffer(t.data, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(t.shape)
    return np.frombuffer(t.data, {"F32": "<f4", "F16": "<f2"}[t.dtype]).astype(np.float64).reshape(t.shape)


def bf16(x: np.ndarray) -> RawTensor:
    return RawTensor("BF16", x.shape, (x.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes())


def lookup(patterns: dict | None, default, module: str):
    return next((v for p, v in (patterns or {}).items() if re.match(rf"(.*\.)?({p})$", module)), default)


def scaling(config: dict, module: str, rank: int) -> float:
    assert lookup(config.get("rank_pattern"), config["r"], module) == rank, module
    alpha = lookup(config.get("alpha_pattern"), config["lora_alpha"], module)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def expert_deltas(tensors: dict[str, RawTensor], config: dict, base: dict) -> dict[tuple, np.ndarray]:
    """(layer, gate|up|down, expert) -> scale * B @ A in float64, as PEFT applies the adapter."""
    experts = base.get("num_experts") or base["num_local_experts"]
    inter = base.get("moe_intermediate_size") or base["intermediate_size"]
    out = {}
    for name in tensors:
        m = re.match(r"base_model\.model\.(.*)\.lora_A\.weight$", name)
        if not m:
            continue
        module, a, b = m[1], values(tensors[name]), values(tensors[name.replace(".lora_A.", ".lora_B.")])
        per = re.match(r"(.*?)(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)$", module)
        fused = re.match(r"(.*?)mlp\.experts(\.base_layer)?$", module)
        if per:
            out[per[1], ROLE[per[3]], int(per[2])] = scaling(config, module, a.shape[0]) * (b @ a)
        elif fused:  # two wrappers nest in parameter order: gate_up_proj is then the inner one, `.base_layer`
            targets = config["target_parameters"]
            targeted = [p for p in ("gate_up_proj", "down_proj") if any(t.endswith(p) for t in targets)]
            param = targeted[0] if fused[2] or len(targeted) == 1 else targeted[1]
            rank = a.shape[0] // experts
            scale = scaling(config, f"{fused[1]}mlp.experts.{param}", rank)
            for e in range(experts):  # PEFT: A as [E, R, in], B as [out, R, E]
                d = scale * (b.reshape(b.shape[0], rank, experts)[:, :, e] @ a.reshape(experts, rank, -1)[e])
                parts = {"gate": d[:inter], "up": d[inter:]} if param == "gate_up_proj" else {"down": d}
                out.update({(fused[1], role, e): x for role, x in parts.items()})
    return out


def assert_same_deltas(source: tuple, converted: tuple, base: Path) -> None:
    """Every expert's delta is bit-identical between two (tensors, config) adapters."""
    a, b = expert_deltas(*source, base_config(base)), expert_deltas(*converted, base_config(base))
    assert any(np.any(x) for x in a.values())
    for key in a.keys() | b.keys():  # a module only one side has must be a zero LoRA on the other
        x, y = a.get(key), b.get(key)
        x = np.zeros_like(y) if x is None else x
        y = np.zeros_like(x) if y is None else y
        assert np.array_equal(x, y), key


def test_per_expert_to_fused_keeps_every_expert_delta():
    tensors, config = adapter(MIXTRAL_V4)
    before = copy.deepcopy(config)
    fused, new = per_expert_to_fused(tensors, config, base_config(MIXTRAL))
    assert config == before  # the input is not edited
    assert_same_deltas((tensors, config), (fused, new), MIXTRAL)
    keys = ("base_layer.lora_A", "base_layer.lora_B", "lora_A")
    shapes = [fused[f"{L0}mlp.experts.{key}.weight"].shape for key in keys]
    assert shapes == [(4 * 8, 32), (2 * 48, 4 * 8), (4 * 4, 48)]  # gate_up at rank 2r, block-diagonal B
    assert new["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert new["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert new["rank_pattern"] == {r"mlp\.experts\.gate_up_proj": 8}
    assert new["alpha_pattern"] == {r"mlp\.experts\.gate_up_proj": 16}
    assert fused[L0 + "self_attn.q_proj.lora_A.weight"] is tensors[L0 + "self_attn.q_proj.lora_A.weight"]


def test_fused_to_per_expert_keeps_every_expert_delta():
    tensors, config = adapter(QWEN_V5)
    per, new = fused_to_per_expert(tensors, config, base_config(QWEN))
    assert_same_deltas((tensors, config), (per, new), QWEN)
    # a general fused B: gate and up both keep the whole A (rank 4) and take their rows of B
    expert = L0 + "mlp.experts.2."
    assert per[expert + "gate_proj.lora_A.weight"].data == per[expert + "up_proj.lora_A.weight"].data
    assert per[L0 + "mlp.experts.2.up_proj.lora_B.weight"].shape == (16, 4)
    assert new["target_parameters"] is None and "mlp.experts.3.down_proj" in new["target_modules"]


@pytest.mark.parametrize("path, base, there, back", [
    (QWEN_V5, QWEN, fused_to_per_expert, per_expert_to_fused),
    (MIXTRAL_V4, MIXTRAL, per_expert_to_fused, fused_to_per_expert),
])
def test_round_trip_is_bit_identical(path, base, there, back):
    tensors, config = adapter(path)
    again, config_again = back(*there(tensors, config, base_config(base)), base_config(base))
    assert raw(again) == raw(tensors)
    assert config_again == config


def raw(tensors: dict[str, RawTensor]) -> dict:
    return {n: (t.dtype, t.shape, t.data) for n, t in tensors.items()}


def gate_only() -> tuple[dict[str, RawTensor], dict]:
    tensors, config = adapter(MIXTRAL_V4)
    tensors = {n: t for n, t in tensors.items() if ".w3." not in n}
    return tensors, {**config, "target_modules": [t for t in config["target_modules"] if t != "w3"]}


def test_gate_without_up_fills_a_zero_up_block():
    tensors, config = gate_only()
    fused, new = per_expert_to_fused(tensors, config, base_config(MIXTRAL))
    assert_same_deltas((tensors, config), (fused, new), MIXTRAL)
    assert fused[L0 + "mlp.experts.base_layer.lora_A.weight"].shape == (4 * 4, 32)  # gate's A alone: no extra rank
    assert raw(fused_to_per_expert(fused, new, base_config(MIXTRAL))[0]) == raw(tensors)


def test_uneven_expert_ranks_pad_with_zeros():
    tensors, config = adapter(MIXTRAL_V4)
    stem = L0 + "block_sparse_moe.experts.3.w2."
    a, b = values(tensors[stem + "lora_A.weight"]), values(tensors[stem + "lora_B.weight"])
    tensors = {**tensors, stem + "lora_A.weight": bf16(np.vstack([a, a])),
               stem + "lora_B.weight": bf16(np.hstack([b, 0 * b]))}
    one = r"layers\.0\..*experts\.3\.w2"  # rank 8 and alpha 16: the same scaling as its neighbours
    config = {**config, "rank_pattern": {one: 8}, "alpha_pattern": {one: 16}}
    fused, new = per_expert_to_fused(tensors, config, base_config(MIXTRAL))
    assert_same_deltas((tensors, config), (fused, new), MIXTRAL)
    down0 = r"model\.layers\.0\.mlp\.experts\.down_proj"  # layer 1 keeps the defaults, 4 and 8
    assert new["rank_pattern"] == {r"mlp\.experts\.gate_up_proj": 8, down0: 8}
    assert new["alpha_pattern"] == {r"mlp\.experts\.gate_up_proj": 16, down0: 16}


def test_rslora_scaling_is_kept_exactly():
    tensors, config = adapter(MIXTRAL_V4)
    config = {**config, "use_rslora": True}
    fused, new = per_expert_to_fused(tensors, config, base_config(MIXTRAL))
    assert_same_deltas((tensors, config), (fused, new), MIXTRAL)
    alpha = new["alpha_pattern"][r"mlp\.experts\.gate_up_proj"]
    assert alpha / math.sqrt(8) == 8 / math.sqrt(4) and alpha != 16  # doubling alpha with r would scale by sqrt(2)


def with_router(tensors: dict[str, RawTensor], config: dict) -> tuple[dict[str, RawTensor], dict]:
    rng = np.random.default_rng(0)
    for layer in (0, 1):
        stem = f"base_model.model.model.layers.{layer}.block_sparse_moe.gate."
        tensors = {**tensors, stem + "lora_A.weight": bf16(rng.normal(0, 0.1, (4, 32))),
                   stem + "lora_B.weight": bf16(rng.normal(0, 0.1, (4, 4)))}
    return tensors, {**config, "target_modules": sorted([*config["target_modules"], "gate"])}


def test_router_lora_becomes_a_parameter_target():
    tensors, config = with_router(*adapter(MIXTRAL_V4))
    fused, new = per_expert_to_fused(tensors, config, base_config(MIXTRAL))
    assert fused[L0 + "mlp.gate.lora_B.weight"].data == tensors[L0 + "block_sparse_moe.gate.lora_B.weight"].data
    assert new["target_parameters"][-1] == "mlp.gate.weight" and "gate" not in new["target_modules"]
    back, config_back = fused_to_per_expert(fused, new, base_config(MIXTRAL))
    assert raw(back) == raw(tensors)
    assert config_back["target_modules"] == sorted({*config["target_modules"], "block_sparse_moe.gate"} - {"gate"})


def test_dropout_and_regex_targets_become_loadable():
    tensors, config = edited(MIXTRAL_V4, lora_dropout=0.05, target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj|w\d)")
    fused, new = per_expert_to_fused(tensors, config, base_config(MIXTRAL))
    assert new["lora_dropout"] == 0.0  # ParamWrapper refuses dropout, an identity at inference
    # the regex would go on naming w1/w3, which PEFT remaps on load: it becomes the exact modules that stay
    attention = ("k_proj", "o_proj", "q_proj", "v_proj")
    assert new["target_modules"] == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in attention]
    tensors, config = edited(QWEN_V5, target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj)")
    _, new = fused_to_per_expert(tensors, config, base_config(QWEN))
    for module, targeted in (("model.layers.1.self_attn.q_proj", True), ("model.layers.0.mlp.experts.3.up_proj", True),
                             ("model.layers.0.mlp.gate", False), ("model.layers.0.mlp.down_proj", False)):
        assert bool(re.fullmatch(new["target_modules"], module)) == targeted, module


def edited(path: Path, **config_edits) -> tuple[dict[str, RawTensor], dict]:
    tensors, config = adapter(path)
    return tensors, {**config, **config_edits}


def mixed_dtypes(path: Path) -> tuple[dict[str, RawTensor], dict]:
    tensors, config = adapter(path)
    name = L0 + "block_sparse_moe.experts.1.w1.lora_A.weight"
    as_f32 = RawTensor("F32", tensors[name].shape, values(tensors[name]).astype("<f4").tobytes())
    return {**tensors, name: as_f32}, config


def both_layouts() -> tuple[dict[str, RawTensor], dict]:
    tensors, config = adapter(QWEN_V5)
    return {**tensors, **fused_to_per_expert(tensors, config, base_config(QWEN))[0]}, config


@pytest.mark.parametrize("make, base, convert, reason", [
    (lambda: edited(MIXTRAL_V4, use_dora=True), MIXTRAL, per_expert_to_fused, "DoRA"),
    (lambda: edited(MIXTRAL_V4, lora_bias=True), MIXTRAL, per_expert_to_fused, "lora_bias"),
    (lambda: edited(QWEN_V5, use_dora=True), QWEN, fused_to_per_expert, "DoRA"),
    (lambda: edited(MIXTRAL_V4, alpha_pattern={r"2\.w3": 16}), MIXTRAL, per_expert_to_fused, "different alpha/r"),
    (lambda: edited(MIXTRAL_V4, rank_pattern={"w2": 8}), MIXTRAL, per_expert_to_fused, "the config says 8"),
    (lambda: edited(QWEN_V5, r=8), QWEN, fused_to_per_expert, "the config says 8"),
    (lambda: edited(QWEN_V5, target_parameters=["down_proj"]), QWEN, fused_to_per_expert, "target_parameters"),
    (lambda: edited(MIXTRAL_V4, peft_type="IA3"), MIXTRAL, per_expert_to_fused, "only LoRA"),
    (lambda: mixed_dtypes(MIXTRAL_V4), MIXTRAL, per_expert_to_fused, "one float dtype"),
    (lambda: adapter(MIXTRAL_V4), FIXTURES / "bases" / "llama", per_expert_to_fused, "'llama'"),
    (lambda: adapter(QWEN_V5), MIXTRAL, fused_to_per_expert, "do not fit"),
    (both_layouts, QWEN, per_expert_to_fused, "both layouts"),
    (both_layouts, QWEN, fused_to_per_expert, "both layouts"),
])
def test_refusals_say_why(make, base, convert, reason):
    with pytest.raises(LayoutRefusal, match=re.escape(reason)):
        convert(*make(), base_config(base))


def test_different_scalings_between_experts_are_refused_not_rescaled():
    tensors, config = edited(MIXTRAL_V4, alpha_pattern={r"layers\.1\.block_sparse_moe\.experts\.0\.w2": 4})
    with pytest.raises(LayoutRefusal, match=r"model\.layers\.1\..*different alpha/r scalings \[1\.0, 2\.0\]"):
        per_expert_to_fused(tensors, config, base_config(MIXTRAL))


# Real PEFT ---------------------------------------------------------------------------------------------


def load_in_peft(base: Path, folder: Path):
    """Logits of `folder` on `base` in float32 through PeftModel.from_pretrained, and the model."""
    torch = pytest.importorskip("torch")
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(model, folder)
    result = peft_model.load_adapter(folder, adapter_name="default")  # once more, for PEFT's own key report
    assert not result.missing_keys and not result.unexpected_keys, result
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = peft_model(ids).logits
        with peft_model.disable_adapter():
            assert not torch.equal(logits, peft_model(ids).logits)  # the adapter does something
    return logits, peft_model


def fused_folder(tmp_path: Path, tensors: dict[str, RawTensor], config: dict) -> Path:
    return save(tmp_path / "fused", *per_expert_to_fused(tensors, config, base_config(MIXTRAL)))


def lora_state(peft_model) -> dict:
    return {n: p for n, p in peft_model.state_dict().items() if "lora_" in n}


def test_v4_adapter_converted_to_fused_loads_like_peft_converts_it(tmp_path):
    tensors, config = adapter(MIXTRAL_V4)
    folder = fused_folder(tmp_path, tensors, config)
    mine, mine_model = load_in_peft(MIXTRAL, folder)
    peft_own, peft_model = load_in_peft(MIXTRAL, MIXTRAL_V4)  # PEFT 0.21.2 fuses mixtral adapters on load itself
    experts = mine_model.base_model.model.model.layers[0].mlp.experts.base_layer.base_layer
    assert experts.gate_up_proj.shape == (4, 2 * 48, 32) and experts.down_proj.shape == (4, 32, 48)  # [E, out, in]
    mine_state, peft_state = lora_state(mine_model), lora_state(peft_model)
    assert mine_state.keys() == peft_state.keys() and all(mine_state[n].equal(peft_state[n]) for n in mine_state)
    # The same float32 weights in the same modules give the same logits, bit for bit.
    assert mine.equal(peft_own)


def test_fused_adapter_converted_to_per_expert_gives_the_same_logits(tmp_path):
    tensors, config = adapter(QWEN_V5)
    folder = save(tmp_path / "per-expert", *fused_to_per_expert(tensors, config, base_config(QWEN)))
    original, _ = load_in_peft(QWEN, QWEN_V5)
    mine, _ = load_in_peft(QWEN, folder)  # PEFT re-fuses it: rank 8 with a zero block per expert, not rank 4
    # Every factor product is exact in float32 (bf16 x bf16), so the fused weights can differ only in the rounding
    # of a few sums taken in another order: a few float32 ulps of weights ~0.1, far below 1e-5 in the logits.
    assert (mine - original).abs().max().item() <= 1e-5


def assert_peft_applies(model, source: dict, layer: int) -> None:
    """PEFT's own delta for the layer's gate_up_proj equals the source's gate and up deltas (float32 rounding)."""
    peft = pytest.importorskip("peft")
    wrapper = model.base_model.model.model.layers[layer].mlp.experts.base_layer
    assert isinstance(wrapper, peft.tuners.lora.layer.ParamWrapper) and wrapper.parameter_name == "gate_up_proj"
    delta = wrapper.get_delta_weight("default").detach().double().numpy()  # [E, 2I, H]
    for e in range(delta.shape[0]):
        for role, rows in (("gate", slice(0, 48)), ("up", slice(48, None))):
            want = source.get((f"model.layers.{layer}.", role, e), np.zeros_like(delta[e, rows]))
            np.testing.assert_allclose(delta[e, rows], want, rtol=1e-6, atol=1e-9)


def test_gate_only_adapter_loads_once_fused(tmp_path):
    tensors, config = gate_only()
    with pytest.raises(ValueError, match="without also targeting w3"):  # PEFT will not fuse it on load
        load_in_peft(MIXTRAL, save(tmp_path / "v4", tensors, config))
    _, model = load_in_peft(MIXTRAL, fused_folder(tmp_path, tensors, config))
    assert_peft_applies(model, expert_deltas(tensors, config, base_config(MIXTRAL)), layer=1)


def test_rslora_adapter_fused_keeps_its_scaling_in_peft(tmp_path):
    tensors, config = edited(MIXTRAL_V4, use_rslora=True)
    _, model = load_in_peft(MIXTRAL, fused_folder(tmp_path, tensors, config))
    assert model.base_model.model.model.layers[0].mlp.experts.base_layer.scaling["default"] == 8 / math.sqrt(4)
    assert_peft_applies(model, expert_deltas(tensors, config, base_config(MIXTRAL)), layer=0)


def test_router_adapter_converted_to_fused_loads_like_peft_converts_it(tmp_path):
    tensors, config = with_router(*adapter(MIXTRAL_V4))
    original, _ = load_in_peft(MIXTRAL, save(tmp_path / "v4", tensors, config))
    mine, _ = load_in_peft(MIXTRAL, fused_folder(tmp_path, tensors, config))
    assert mine.equal(original)


def test_a_pathological_rank_pattern_is_refused_not_run():
    from adapter_doctor.fixers.moe_layout import LayoutRefusal, expert_layout

    with pytest.raises(LayoutRefusal, match=r"rank_pattern key '\(a\*\)\*b'.*not run"):
        expert_layout({"peft_type": "LORA", "rank_pattern": {"(a*)*b": 4}}, {"model_type": "qwen3_moe"})


@pytest.mark.parametrize("base", [MIXTRAL, QWEN])
def test_the_layout_takes_its_sizes_and_names_from_the_base_facts(base):
    from adapter_doctor.base_model import expert_dims, expert_regex
    from adapter_doctor.fixers.moe_layout import expert_layout

    layout = expert_layout({"peft_type": "LORA"}, base_config(base))
    assert (layout.experts, layout.hidden, layout.intermediate) == expert_dims(base_config(base))
    assert layout.expert_regex(r"\d+") == expert_regex(layout.per_expert)
    assert re.fullmatch(layout.expert_regex(r"(\d+)"), layout.per_expert.format(e=11)).group(1) == "11"
    sizes = {k: v for k, v in base_config(base).items() if k != "num_local_experts"}
    with pytest.raises(LayoutRefusal, match="number of experts"):
        expert_layout({"peft_type": "LORA"}, sizes)


def test_a_pathological_alpha_pattern_is_refused_and_plain_keys_pass():
    from adapter_doctor.fixers.moe_layout import expert_layout

    with pytest.raises(LayoutRefusal, match=r"alpha_pattern key '\(x\+\)\+y'.*not run"):
        expert_layout({"peft_type": "LORA", "alpha_pattern": {"w1": 4, "(x+)+y": 4}}, base_config(MIXTRAL))
    assert expert_layout({"peft_type": "LORA", "rank_pattern": {"w1": 4, r"experts\.0\.w2": 8}},
                         base_config(MIXTRAL)).experts == 4
