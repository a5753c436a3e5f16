"""runtime.load and runtime.save_adapter: plain PEFT files with provenance the doctor reads back."""
import json
import shutil
import warnings

import torch
import transformers
from adapter_doctor import Options, diagnose
from adapter_doctor.runtime import load, save_adapter
from adapter_doctor.safetensors_header import read_header
from conftest import FIXTURES
from peft import PeftModel

BASE = FIXTURES / "bases" / "llama"
ADAPTER = FIXTURES / "healthy" / "llama-lora"


def test_load_an_adapter_folder_gives_a_patched_trainable_model():
    model, tokenizer = load(ADAPTER, max_seq_length=256)
    assert tokenizer is None  # the tiny fixtures ship none
    assert model.training and any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert any(getattr(m, "_adapter_doctor_patch", None) for m in model.modules())
    assert model.max_seq_length == 256


def test_load_a_model_folder():
    model, _ = load(BASE)
    assert isinstance(model, transformers.PreTrainedModel)
    assert any(getattr(m, "_adapter_doctor_patch", None) for m in model.modules())


def test_saved_adapter_is_plain_peft_and_carries_provenance(tmp_path):
    model, _ = load(ADAPTER, max_seq_length=512)
    out = save_adapter(model, tmp_path / "saved")
    meta = read_header(out / "adapter_model.safetensors").metadata
    assert meta["format"] == "pt" and meta["adapter_doctor.max_seq_length"] == "512"
    assert json.loads(meta["adapter_doctor.patch_set"])["modules"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert not [k for k in config if k.startswith("adapter_doctor")]  # never in the config: old PEFT would raise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vanilla = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(BASE), str(out))
    # not one warning from PEFT (transformers' own deprecation notices are not about the files)
    assert [str(w.message) for w in caught if "/peft/" in w.filename] == []
    vanilla.eval()
    model.eval()
    ids = torch.arange(1, 13).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(vanilla(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_doctor_reads_the_provenance_back(tmp_path):
    model, _ = load(ADAPTER, max_seq_length=4096)
    out = save_adapter(model, tmp_path / "saved")
    found = {f.id: f for f in diagnose([out]).findings}
    assert "ADC311" in found and "ADC309" not in found
    wide = {f.id: f for f in diagnose([out], Options(base=FIXTURES / "bases" / "llama-wide")).findings}
    assert "hidden_size 32 -> 48" in wide["ADC309"].message
    saved_major = int(transformers.__version__.split(".")[0])
    other = "4.57.6" if saved_major >= 5 else "5.0.0"
    assert "ADC853" in {f.id for f in diagnose([out], Options(target_transformers=other)).findings}
    small = tmp_path / "small-base"
    shutil.copytree(BASE, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (small / "config.json").write_text(json.dumps(config))
    assert "ADC310" in {f.id for f in diagnose([out], Options(base=small)).findings}
