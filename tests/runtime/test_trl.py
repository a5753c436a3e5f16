"""TRL's SFTTrainer and transformers' Trainer with the runtime: the same losses, and their forwards kept.

SFTTrainer puts a fused-head forward on the causal LM instance; accelerate's bf16 mode puts an fp32-output,
autocast forward on the model it prepares. `ensure_patched` must leave both in place in any order of calls,
and each run's per-step losses must be those of the same run without adapter-doctor.
"""
import random

import pytest
import torch
import transformers
from adapter_doctor import inspect_model
from adapter_doctor.runtime import ensure_patched, load
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from trl import SFTConfig, SFTTrainer

WORDS = "the cat dog sat on a mat and ran to red blue big small house tree is was very fast".split()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MARKER = "_adapter_doctor_patch"
HEAD = "base_model.model"  # the causal LM inside a PeftModel, where TRL puts its forward
PACKING = pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>", unk_token="<unk>")


def llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


def lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def sft_trainer(model, out, packing, processing_class=None, checkpointing=False, **kwargs):
    rng = random.Random(0)
    data = Dataset.from_dict({"text": [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(16)]})
    # packing turns padding-free on: one row per batch, no attention mask, sequences told apart by position_ids
    args = SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                     learning_rate=1e-3, max_length=32, packing=packing, gradient_checkpointing=checkpointing,
                     use_cpu=True, bf16=False, seed=0, data_seed=0, dataloader_num_workers=0,
                     dataloader_pin_memory=False, save_strategy="no", report_to="none", disable_tqdm=True)
    torch.manual_seed(0)  # the LoRA initialisation, when SFTTrainer attaches the adapter itself
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=processing_class or tokenizer(),
                      **kwargs)


def plain_trainer(model, out, bf16):
    rng = random.Random(0)
    rows = [[rng.randrange(4, 24) for _ in range(12)] for _ in range(16)]
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=4,
                                          logging_steps=1, learning_rate=1e-3, use_cpu=True, bf16=bf16, seed=0,
                                          dataloader_num_workers=0, save_strategy="no", report_to="none",
                                          disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows,
                                                                                         "labels": rows}))


def losses(trainer):
    trainer.train()
    out = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(out) == 3, trainer.state.log_history
    return out


def causal_lm(model):
    return model.get_base_model() if isinstance(model, PeftModel) else model


def decoder_layers(model):
    return [m for m in model.modules() if isinstance(m, transformers.models.llama.modeling_llama.LlamaDecoderLayer)]


def assert_ours(model):
    """Every decoder layer runs our forward: our class, and no instance forward over it."""
    layers = decoder_layers(model)
    assert len(layers) == 2 and all(MARKER in vars(type(m)) and "forward" not in vars(m) for m in layers)


def assert_patched(model, report):
    assert report.changed > 0 and not report.failures, report.modules
    assert_ours(model)


def errors(report):
    return [f for f in report.findings if f.severity.value == "error" or f.id == "ADC901"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base folder with its tokenizer, and an adapter for it saved by PEFT (B non-zero, so it counts)."""
    root = tmp_path_factory.mktemp("trl-saved")
    llama().save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    peft_model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(root / "base"), lora())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(root / "adapter")
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, saved):
    """reference(kind, packing): per-step losses of the run without adapter-doctor, each computed once."""
    cache = {}

    def get(kind, packing):
        if (kind, packing) not in cache:
            out = tmp_path_factory.mktemp("trl-reference")
            if kind == "attached":
                trainer = sft_trainer(llama(), out, packing, peft_config=lora())
            else:
                base = transformers.AutoModelForCausalLM.from_pretrained(saved / "base")
                model = PeftModel.from_pretrained(base, str(saved / "adapter"), is_trainable=True)
                trainer = sft_trainer(model, out, packing)
            assert not any(MARKER in vars(type(m)) for m in trainer.model.modules())
            cache[kind, packing] = losses(trainer)
        return cache[kind, packing]

    return get


@PACKING
def test_patched_before_sft_trainer(tmp_path, reference, packing):
    model = llama()
    assert_patched(model, ensure_patched(model))
    trainer = sft_trainer(model, tmp_path, packing, peft_config=lora())
    head = causal_lm(trainer.model)
    assert "forward" in vars(head) and MARKER in vars(type(head))  # TRL's head around our forward
    assert losses(trainer) == pytest.approx(reference("attached", packing), rel=1e-5)
    assert_ours(trainer.model)


@PACKING
def test_patched_after_sft_trainer(tmp_path, reference, packing):
    trainer = sft_trainer(llama(), tmp_path, packing, peft_config=lora())
    head = causal_lm(trainer.model)
    trl_forward = vars(head)["forward"]
    report = ensure_patched(trainer.model)
    assert_patched(trainer.model, report)
    assert vars(head)["forward"] is trl_forward
    assert [(m.path, "(trl)" in m.reason) for m in report.kept] == [(HEAD, True)], report.modules
    assert losses(trainer) == pytest.approx(reference("attached", packing), rel=1e-5)
    assert vars(head)["forward"] is trl_forward
    again = ensure_patched(trainer.model)
    assert again.changed == 0 and [m.path for m in again.kept] == [HEAD]


@pytest.mark.parametrize("trainer_checkpointing", [False, True], ids=["off", "on"])
def test_offloaded_checkpointing_under_sft_trainer(tmp_path, reference, trainer_checkpointing):
    # The order the README gives: patch, let SFTTrainer attach the adapter, enable offloading on its model. With
    # the trainer's own checkpointing on (SFTConfig's default), train() puts torch's checkpoint back over ours:
    # the losses are the same either way, and inspect_model says which layers lost the offloading.
    from adapter_doctor.runtime import enable_offloaded_checkpointing, host_plan

    model = llama()
    ensure_patched(model)
    trainer = sft_trainer(model, tmp_path, False, peft_config=lora(), checkpointing=trainer_checkpointing)
    assert enable_offloaded_checkpointing(trainer.model) == 2
    assert losses(trainer) == pytest.approx(reference("attached", False), rel=1e-5)
    assert_ours(trainer.model)
    replaced = [f for f in inspect_model(trainer.model).findings if f.id == "ADC912"]
    assert len(replaced) == int(trainer_checkpointing)
    plan = host_plan(trainer.model)
    assert plan.layers == 2 and (plan.layers_offloaded == 0) == trainer_checkpointing  # ours ran, or never did


@PACKING
def test_loaded_adapter_in_sft_trainer(tmp_path, reference, saved, packing):
    model, tok = load(saved / "adapter")
    assert tok is not None  # the base folder's
    assert_ours(model)
    trainer = sft_trainer(model, tmp_path, packing, processing_class=tok)
    assert losses(trainer) == pytest.approx(reference("loaded", packing), rel=1e-5)
    assert_ours(trainer.model)


@pytest.mark.parametrize("with_lora", [True, False], ids=["lora", "bare"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_plain_trainer_then_inspect_and_patch(tmp_path, bf16, with_lora):
    torch.manual_seed(0)
    model = get_peft_model(llama(), lora()) if with_lora else llama()
    trainer = plain_trainer(model, tmp_path, bf16)
    trainer.train()
    wrapper = vars(model).get("forward")
    assert (wrapper is not None) == bf16  # accelerate's fp32-output forward, only in mixed precision
    assert errors(inspect_model(model)) == []
    assert_patched(model, ensure_patched(model))
    assert vars(model).get("forward") is wrapper
    assert errors(inspect_model(model)) == []
    autocast = []
    hook = decoder_layers(model)[0].register_forward_pre_hook(
        lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
    trainer.train()
    hook.remove()
    assert autocast and set(autocast) == {bf16}  # the wrapper still runs, autocast with it
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert vars(model).get("forward") is wrapper


@pytest.mark.parametrize("patched_first", [False, True], ids=["library", "patched-first"])
def test_inspect_after_sft_trainer_names_trl(tmp_path, patched_first):
    model = llama()
    if patched_first:
        ensure_patched(model)
    trainer = sft_trainer(model, tmp_path, packing=False, peft_config=lora())
    report = inspect_model(trainer.model)
    assert errors(report) == []
    head = [f for f in report.findings if f.path == HEAD]
    assert len(head) == 1, report.findings
    message = head[0].message
    assert "_fused_forward (trl)" in message and "(adapter-doctor)" not in message, message
    assert ("impl=causal_lm" in message) == patched_first, message
