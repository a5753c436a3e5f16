"""Real adapters from public repositories: every one is checked without crashing, and the problems
reported are exactly these, each verified by hand (e.g. the all-zero lora_B tensors were read back
with safetensors)."""
import pytest
from conftest import DATA, check

REAL = DATA / "real-adapters"
EXPECTED = {
    "000-0112LY__logo-gemma-lora__adapter": set(),
    "001-BK7195__deltacompression-poc__adapter": set(),
    "005-CruiseDevice__Fine-Tuning-LLM-with-LoRA-and-QLoRA__Lightweight Fine-Tuning_peft_model": set(),
    "007-Hareshjethani__BERT-GPT2-Multitask-Finetuning__": set(),
    "008-Inishpy__lerobot-libero__": {"ADC105"},  # lerobot's own adapter format under PEFT's file names
    "009-Kimiko-AI__LoRa-traingcode__lora-alpaca": {"ADC423"},
    "010-LMHan122__lightweight-fine-tuning-peft__gpt-lora": {"ADC423"},  # `score` is kept by SEQ_CLS itself
    "011-RifqiCah__Adalora_indonesiaDataset__models_emot_adalora_best": set(),
    "030-Rishabh-Dixit04__VQA_MLOps__lora_weights": {"ADC703"},  # every lora_B is 0.0
    "031-RishitToteja__llm-tuning__": {"ADC423"},
    "033-T-Sharif__lightweight-fine-tuning__bert-lora": {"ADC423"},
    "040-UnivDonguk22__gitpod_ai__peft_model": {"ADC423"},
    "041-bbrokesoul__Text-to-Image-generator__lora_model": set(),
    "043-diaoenmao__LLM-for-Recommender-Systems__Lora_example_t5_small_results2": {"ADC423"},
    "045-gsj-rifat__Lightweight-Fine-Tuning-with-PEFT__tmp": {"ADC423"},
    "056-lockheed886__Vision-Transformers-for-Food-Classification__final_model": set(),
    "058-polarbeargo__Apply-Lightweight-Fine-Tuning-LLMs__segformer-scene-parse-150-lora": set(),
    "063-sherryxzhao__lora_alpaca__output": {"ADC412", "ADC301"},  # a zip cut off at 1.25 MiB
    "065-stathopoan__Apply-Lightweight-Fine-Tuning-to-a-Foundation-LLM-Model__lora_model": set(),
    "066-sukhmandhawan__LightWeightFineTUning__peft_model": {"ADC703"},
    "075-yoonyerin__be-great__": {"ADC423"},
    "078-Hastws__NVIDIA-Nemotron-Model-Reasoning-Challenge__adapter": {"ADC403", "ADC301"},  # 0-byte weights
    "079-requie__OptikalLLM__": {"ADC106", "ADC403"},  # a text placeholder for the weights
}


def test_every_real_adapter_is_listed():
    assert {p.name for p in REAL.iterdir() if p.is_dir()} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_adapter_findings(name):
    problems = {f.id for f in check(REAL / name) if f.severity.value != "info"}
    assert problems == EXPECTED[name]
