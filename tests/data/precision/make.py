#!/usr/bin/env python3
"""Build the adapters under tests/data/precision/, each saved by a real PEFT release.

Run from the repository root; the release is chosen with PYTHONPATH, so one interpreter (torch 2.13,
transformers 5.24) serves them all:

    pip install --no-deps --target /tmp/peft-0.2.0 peft==0.2.0      (likewise 0.18.1, 0.19.1)
    .venv/bin/python tests/data/precision/make.py current            # PEFT 0.21.2: SEQ_CLS heads, empty weights
    PYTHONPATH=/tmp/peft-0.2.0 .venv/bin/python tests/data/precision/make.py peft-0.2
    PYTHONPATH=/tmp/peft-0.18.1 .venv/bin/python tests/data/precision/make.py peft-0.18
    PYTHONPATH=/tmp/peft-0.19.1 .venv/bin/python tests/data/precision/make.py peft-0.19
    /tmp/compat/bin/python tests/data/precision/make.py v4     # torch 2.13, transformers 4.57.6, PEFT 0.17.1

Each adapter's `base_model_name_or_path` is a path relative to the repository root. Where a test
compares logits, the logits PEFT computed in memory right after building the adapter are saved
beside it as `<name>.logits.safetensors`.
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REL = HERE.relative_to(HERE.parents[2]).as_posix()
TOKENS = torch.tensor([list(range(1, 17))])


def fresh(name: str) -> Path:
    path = HERE / name
    if path.exists():
        shutil.rmtree(path)
    return path


def nonzero_b(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "bone_block" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def save(model, name: str, logits: bool = False) -> None:
    out = fresh(name)
    model.save_pretrained(str(out))
    for card in out.rglob("README.md"):
        card.unlink()
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    if logits:
        model.eval()
        with torch.no_grad():
            save_file({"logits": model(input_ids=TOKENS).logits.float().contiguous()}, str(HERE / f"{name}.logits.safetensors"))


def current() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, LlamaForSequenceClassification

    torch.manual_seed(1)
    base = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=3))
    base.save_pretrained(str(fresh("bases/distilbert")))
    base = DistilBertForSequenceClassification.from_pretrained(f"{REL}/bases/distilbert")
    # modules_to_save names "classifier"; PEFT's suffix match wraps "pre_classifier" as well
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"],
                                            modules_to_save=["classifier"]))
    nonzero_b(model, 2)
    save(model, "distilbert-seq-cls", logits=True)

    torch.manual_seed(3)  # a SEQ_CLS adapter on a base saved as LlamaForCausalLM
    base = LlamaForSequenceClassification.from_pretrained("fixtures/bases/llama", num_labels=2)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    nonzero_b(model, 4)
    save(model, "llama-seq-cls", logits=True)

    out = fresh("empty-weights")  # a real config beside a safetensors file whose header is {}
    shutil.copytree("fixtures/healthy/llama-lora", out)
    (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")


def peft_02() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(5)
    base = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=64))
    base.save_pretrained(str(fresh("bases/gpt-neox")))
    base = GPTNeoXForCausalLM.from_pretrained(f"{REL}/bases/gpt-neox")
    # PEFT 0.2's MergedLinear: LoRA on the q and v thirds of the fused query_key_value
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["query_key_value"], enable_lora=[True, False, True]))
    nonzero_b(model, 6)
    save(model, "neox-merged-qkv-peft0.2")
    config_path = HERE / "neox-merged-qkv-peft0.2" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = f"{REL}/bases/gpt-neox"  # 0.2 records "" for a model built in memory
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def moe(name: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained("fixtures/bases/qwen3_moe")
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"],
                                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    nonzero_b(model, 8)
    save(model, name, logits=True)


def bone() -> None:
    from peft import BoneConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(9)
    base = AutoModelForCausalLM.from_pretrained("fixtures/bases/llama")
    model = get_peft_model(base, BoneConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    nonzero_b(model, 10)
    save(model, "llama-bone-peft0.18", logits=True)
    torch.manual_seed(13)  # the "bat" mode: blocks also multiply the base weight's blocks
    base = AutoModelForCausalLM.from_pretrained("fixtures/bases/llama")
    model = get_peft_model(base, BoneConfig(task_type="CAUSAL_LM", r=4, init_weights="bat", target_modules=["q_proj", "v_proj"]))
    nonzero_b(model, 14)
    save(model, "llama-bone-bat-peft0.18", logits=True)


def mixtral_v4_rank_pattern() -> None:
    """transformers 4.57 + PEFT 0.17.1: per-expert LoRA whose experts' w1 have their own rank."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    base = AutoModelForCausalLM.from_pretrained("fixtures/bases/mixtral-v4")
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, rank_pattern={"w1": 8},
                                            target_modules=["q_proj", "v_proj", "w1", "w2", "w3"]))
    nonzero_b(model, 12)
    save(model, "mixtral-v4-rank-pattern", logits=True)


STAGES = {"v4": mixtral_v4_rank_pattern, "current": current, "peft-0.2": peft_02, "peft-0.18": lambda: (moe("qwen3moe-target-parameters-peft0.18"), bone()),
          "peft-0.19": lambda: moe("qwen3moe-target-parameters-peft0.19")}

if __name__ == "__main__":
    STAGES[sys.argv[1]]()
