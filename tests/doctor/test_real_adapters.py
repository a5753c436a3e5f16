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
    "056-lockheed886__Vision-Transformers-for-Food-Classification__final_model": {"ADC518"},  # transformers 5.9 renamed query/value: NoMatchingPeftModuleError (test_module_renames)
    "058-polarbeargo__Apply-Lightweight-Fine-Tuning-LLMs__segformer-scene-parse-150-lora": {"ADC518"},  # transformers 5.9 renamed query/value: NoMatchingPeftModuleError (test_module_renames)
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


# Severity of each expected finding, checked by hand: ADC423 is advice (a passing pickle), ADC703 a no-op adapter
# that still loads, ADC301 a base path from another machine; the rest stop the adapter from loading.
SEVERITY = {"ADC105": "error", "ADC106": "error", "ADC301": "warning", "ADC403": "error", "ADC412": "error",
            "ADC423": "warning", "ADC703": "warning", "ADC518": "error"}


@pytest.mark.parametrize("name", sorted(n for n, found in EXPECTED.items() if found))
def test_real_adapter_severities(name):
    found = {f.id: f.severity.value for f in check(REAL / name) if f.severity.value != "info"}
    assert found == {i: SEVERITY[i] for i in EXPECTED[name]}


# Adapters whose base can be rebuilt offline from a transformers config class: the defaults of GPT2Config,
# BertConfig and T5Config are gpt2, bert-base-uncased and t5-small; bert-tiny's sizes are given. Random
# weights suffice: a reload checks which keys and shapes PEFT accepts, not what the model computes.
BERT_TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
REBUILD = {
    "005-CruiseDevice__Fine-Tuning-LLM-with-LoRA-and-QLoRA__Lightweight Fine-Tuning_peft_model": ("GPT2", {}),
    "007-Hareshjethani__BERT-GPT2-Multitask-Finetuning__": ("Bert", {}),
    "010-LMHan122__lightweight-fine-tuning-peft__gpt-lora": ("GPT2", {}),
    "011-RifqiCah__Adalora_indonesiaDataset__models_emot_adalora_best": ("Bert", BERT_TINY),
    "030-Rishabh-Dixit04__VQA_MLOps__lora_weights": ("Bert", {**BERT_TINY, "is_decoder": True}),
    "033-T-Sharif__lightweight-fine-tuning__bert-lora": ("Bert", {}),
    "043-diaoenmao__LLM-for-Recommender-Systems__Lora_example_t5_small_results2": ("T5", {}),
    "045-gsj-rifat__Lightweight-Fine-Tuning-with-PEFT__tmp": ("GPT2", {}),
    "065-stathopoan__Apply-Lightweight-Fine-Tuning-to-a-Foundation-LLM-Model__lora_model": ("GPT2", {}),
    "066-sukhmandhawan__LightWeightFineTUning__peft_model": ("GPT2", {}),
    "075-yoonyerin__be-great__": ("GPT2", {}),
}
CLASSES = {("GPT2", "SEQ_CLS"): "GPT2ForSequenceClassification", ("GPT2", "CAUSAL_LM"): "GPT2LMHeadModel",
           ("Bert", "SEQ_CLS"): "BertForSequenceClassification", ("Bert", "CAUSAL_LM"): "BertLMHeadModel",
           ("T5", "SEQ_2_SEQ_LM"): "T5ForConditionalGeneration"}


def _rebuilt_base(name: str):
    """The base class the adapter's task type builds, random-initialised at the base's real sizes."""
    import json

    import torch
    import transformers
    from peft.utils import load_peft_weights

    family, sizes = REBUILD[name]
    task = json.loads((REAL / name / "adapter_config.json").read_text())["task_type"]
    heads = [t for k, t in load_peft_weights(str(REAL / name)).items() if k.endswith(("score.weight", "classifier.weight"))]
    labels = {"num_labels": heads[0].shape[0]} if heads else {}
    config = getattr(transformers, f"{family}Config")(**sizes, **labels)
    if family == "GPT2":
        config.pad_token_id = config.eos_token_id
    torch.manual_seed(0)
    return getattr(transformers, CLASSES[(family, task)])(config).eval()


@pytest.mark.parametrize("name", sorted(REBUILD))
def test_real_adapter_reloads_as_the_verdict_says(name):
    pytest.importorskip("peft", reason="needs the [torch] extra")
    import warnings

    import torch
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    assert not {i for i in EXPECTED[name] if SEVERITY[i] == "error"}  # every rebuilt one is judged loadable
    model = _rebuilt_base(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(REAL / name))
    assert not [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    # loading the saved tensors again reports what PEFT kept and dropped: nothing dropped, no LoRA weight left out
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(REAL / name)))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k or "prompt" in k]
    state = peft_model.state_dict()
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    zero = bool(lora_b) and all(not v.any() for v in lora_b)
    assert zero == ("ADC703" in EXPECTED[name])  # the all-zero verdict, read back from the loaded model
    if zero:  # and a zero lora_B means the LoRA part changes nothing
        assert all(torch.equal(v, torch.zeros_like(v)) for v in lora_b)
