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
