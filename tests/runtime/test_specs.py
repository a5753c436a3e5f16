"""The spec table against the installed transformers: every row names a real class with what it needs."""

from adapter_doctor.runtime import specs
from adapter_doctor.runtime.modules import IMPLEMENTATIONS


def test_every_row_matches_modules_that_have_what_it_needs(tiny, arch):
    model = tiny.base(arch)
    assert specs.supported(arch)
    for spec in specs.specs_for(arch):
        assert spec.implementation in IMPLEMENTATIONS
        matched = [m for m in model.modules() if (specs.match((spec,), m) or (None,))[0] is spec]
        assert matched, f"no {spec.class_name} in a {arch} model"
        for module in matched:
            assert all(hasattr(module, need) for need in spec.needs), (spec.class_name, spec.needs)


def test_shared_implementations_serve_every_architecture():
    used = {spec.implementation for rows in specs.ARCHITECTURES.values() for spec in rows}
    assert used == set(IMPLEMENTATIONS)
    assert len(specs.ARCHITECTURES) >= 4 and not specs.supported("gpt2") and specs.specs_for(None) == ()


def test_matching_ignores_classes_outside_transformers():
    class LlamaAttention:  # same name, not the library's
        pass

    assert specs.match(specs.specs_for("llama"), LlamaAttention()) is None


def test_gemma3_and_phi3_are_rows_of_the_shared_implementations():
    from adapter_doctor.runtime.options import AttentionOptions, MlpOptions

    llama = {spec.implementation for spec in specs.specs_for("llama")}
    for arch in ("gemma3_text", "phi3"):
        assert {spec.implementation for spec in specs.specs_for(arch)} == llama
    phi3 = {spec.implementation: spec for spec in specs.specs_for("phi3")}
    assert phi3["attention"].options == AttentionOptions(
        fused_qkv="qkv_proj", interface_kwargs=(("sliding_window", "config.sliding_window"),))
    assert "qkv_proj" in phi3["attention"].needs and "q_proj" not in phi3["attention"].needs
    assert phi3["gated_mlp"].options == MlpOptions(act_attr="activation_fn", fused_gate_up="gate_up_proj")
    assert phi3["gated_mlp"].needs == ("gate_up_proj", "down_proj", "activation_fn")
    gemma3 = {spec.implementation: spec for spec in specs.specs_for("gemma3_text")}
    assert gemma3["attention"].options.qk_norm and gemma3["decoder_layer"].options.sandwich_norm


def test_phi3_with_residual_dropout_is_left_unpatched_with_its_reason(tiny):
    from adapter_doctor.runtime import ensure_patched

    model = tiny.lora(tiny.base("phi3", resid_pdrop=0.1))
    report = ensure_patched(model)
    skipped = [m for m in report.modules if m.module_type == "Phi3DecoderLayer"]
    assert skipped and all("resid_attn_dropout has p=0.1" in m.reason for m in skipped)
    assert any(m.module_type == "Phi3Attention" and m.action == "patched" for m in report.modules)


def test_the_mlp_check_reads_the_activation_the_specs_options_name():
    import torch
    from adapter_doctor.runtime.modules import check_mlp
    from adapter_doctor.runtime.options import MlpOptions

    # a family whose activation sits under a name of its own: the check follows the spec, not a fixed list
    module = torch.nn.Module()
    module.act_fn, module.family_act = torch.nn.ReLU(), torch.nn.SiLU()
    assert check_mlp(module, MlpOptions(act_attr="family_act")) is None
    assert check_mlp(module, MlpOptions()) == "activation ReLU has no kernel"
