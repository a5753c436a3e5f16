"""The patched causal-LM head: the loss without logits in training, exact gradients for an adapted lm_head."""
import torch
from adapter_doctor.runtime import ensure_patched
from peft import LoraConfig, get_peft_model


def test_lora_on_lm_head_gets_its_gradients(tiny):
    def model():
        m = get_peft_model(tiny.base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj", "lm_head"]))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        return m

    ids = tiny.batch()
    expected = tiny.run(model(), ids)
    patched = model()
    ensure_patched(patched)
    got = tiny.run(patched, ids)
    assert any("lm_head.lora_A" in name for name in got[2])
    assert tiny.rel(got[1], expected[1]) <= 1e-5
    for name, grad in expected[2].items():
        assert tiny.rel(got[2][name], grad) <= 1e-4, name


def test_training_with_labels_returns_the_loss_only_and_eval_returns_logits(tiny):
    model = tiny.lora(tiny.base())
    ensure_patched(model)
    ids = tiny.batch()
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.loss is not None and out.logits is None
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and out.loss is not None
