"""The plain-reload scenario with the real Unsloth package on a CUDA GPU: FastLanguageModel class-patches
transformers' Llama classes process-wide, so an adapter reloaded afterwards with plain HF + PEFT crashes on unsloth
2025.11.1 ('LlamaAttention' object has no attribute 'apply_qkv') and trains on 2026.10.9 (patches gated per instance).
One module-scoped fixture runs every stage in this process (the pollution is the point) and a clean reference in a
subprocess that never imports unsloth; each test checks one acceptance point. Run this file alone: the patches leak
into whatever runs after it. The JSON summary is printed and, when $UNSLOTH_RESULT_JSON is set, written there.
"""
import contextlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import traceback

import pytest

torch = pytest.importorskip("torch")

MISSING = ("the unsloth package is not installed" if importlib.util.find_spec("unsloth") is None  # imports nothing
           else "" if torch.cuda.is_available() else "no CUDA GPU")
pytestmark = [pytest.mark.unsloth, pytest.mark.skipif(bool(MISSING), reason=f"needs unsloth and CUDA: {MISSING}")]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PLAIN_RELOAD_CRASHES = {"2025.11.1": True, "2026.10.9": False}  # known outcomes, from reading both releases
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "UNSLOTH_DISABLE_STATISTICS": "1", "UNSLOTH_DISABLE_AUTO_UPDATES": "1"}
VERSIONS = ["unsloth", "unsloth-zoo", "transformers", "peft", "torch", "triton", "adapter-doctor"]  # normalised


def lora_step(model, batch):
    """(loss, {LoRA parameter: L2 norm of its gradient}) of one forward and backward; no update, grads cleared."""
    model.train()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    norms = {n.removeprefix("base_model.model.model.").replace(".default.weight", ""):
             (p.grad.float().norm().item() if p.grad is not None else None)
             for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    model.zero_grad(set_to_none=True)
    return loss.item(), norms


# The reference runs in a fresh interpreter so no Unsloth patch can reach it; lora_step is shared by source.
CLEAN = "import sys, torch\n" + inspect.getsource(lora_step) + textwrap.dedent('''
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, adapter_dir, resaved_dir, plain_dir, batch_file, out = sys.argv[1:]
    batch = torch.load(batch_file).cuda()
    def base():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    loss, norms = lora_step(PeftModel.from_pretrained(base(), adapter_dir, is_trainable=True), batch)
    logits = {}
    for name, folder in (("resaved", resaved_dir), ("plain", plain_dir)):
        with torch.no_grad():
            logits[name] = PeftModel.from_pretrained(base(), folder).eval()(input_ids=batch).logits.cpu()
    torch.save({"loss": loss, "norms": norms, "logits": logits, "unsloth_imported": "unsloth" in sys.modules}, out)
''')


@contextlib.contextmanager
def stage(results, name):
    """Record a stage's exception instead of raising it, so the tests of the other stages still report."""
    try:
        yield
    except Exception:  # noqa: BLE001 - recorded for the test of that stage to report
        results["errors"][name] = traceback.format_exc(limit=-12)


def build_base(base_dir):
    """A random bf16 Llama with a local WordLevel tokenizer: everything FastLanguageModel needs, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 512)}}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>", model_max_length=512).save_pretrained(base_dir)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, pad_token_id=0,
                         eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base_dir)


def findings(model):
    from adapter_doctor import inspect_model

    return [{"id": f.id, "severity": f.severity.value, "title": f.title, "message": f.message}
            for f in inspect_model(model).findings]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("unsloth")
    base_dir, adapter_dir, resaved_dir, plain_dir = (str(work / n) for n in ("base", "adapter", "resaved", "plain"))
    env = {**os.environ, **OFFLINE}  # taken before unsloth is imported: the reference gets the same PYTHONPATH
    R = {"versions": {}, "errors": {}, "unsloth": {}, "plain": {}, "load": {}, "clean": {}}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        mp.chdir(work)  # Unsloth writes unsloth_compiled_cache/ into the working directory
        with stage(R, "unsloth"):
            import unsloth  # noqa: F401  (first, before transformers, as Unsloth asks)
            from unsloth import FastLanguageModel

            build_base(base_dir)
            batch = torch.randint(4, 512, (2, 64), generator=torch.Generator().manual_seed(0))
            torch.save(batch, work / "batch.pt")
            batch = batch.cuda()
            model, _ = FastLanguageModel.from_pretrained(base_dir, max_seq_length=256, dtype=torch.bfloat16,
                                                         load_in_4bit=False)
            model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS,
                                                     lora_dropout=0, bias="none", use_gradient_checkpointing=False,
                                                     random_state=0)
            R["unsloth"]["findings"] = findings(model)
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            R["unsloth"]["train_losses"] = []
            for _ in range(3):  # enough for lora_B to move off zero, so the adapter matters
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                R["unsloth"]["train_losses"].append(loss.item())
            model.save_pretrained(adapter_dir)
            del model, optimizer
        installed: dict = {}  # the first on sys.path is the one imported
        for d in importlib.metadata.distributions():
            installed.setdefault(d.name.lower().replace("_", "-"), d.version)
        R["versions"] = {p: installed.get(p) for p in VERSIONS} | {"gpu": torch.cuda.get_device_name()}

        with stage(R, "plain"):
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
            plain = PeftModel.from_pretrained(base.cuda(), adapter_dir, is_trainable=True).train()
            R["plain"]["base_model_name_or_path"] = plain.peft_config["default"].base_model_name_or_path
            R["plain"]["findings"] = findings(plain)  # before any forward: the prediction
            try:
                R["plain"]["step_loss"], _ = lora_step(plain, batch)
                R["plain"]["step_error"] = None
            except Exception as exc:  # noqa: BLE001 - the failure as users meet it
                plain.zero_grad(set_to_none=True)
                R["plain"]["step_error"] = f"{type(exc).__name__}: {exc}"

        with stage(R, "patch"):
            from adapter_doctor import ensure_patched
            from adapter_doctor.runtime import save_adapter

            report = ensure_patched(plain)
            R["plain"]["report"] = {"kernels": report.kernels, "counts": report.counts, **{
                kind: [f"{m.path or '(model)'} ({m.module_type}): {m.reason}" for m in getattr(report, kind)]
                for kind in ("repaired", "restored", "kept")}}
            R["plain"]["findings_after"] = findings(plain)
            R["plain"]["loss"], R["plain"]["norms"] = lora_step(plain, batch)
            save_adapter(plain, resaved_dir)
            plain.save_pretrained(plain_dir)  # PEFT's own save of the same weights, to compare against
            del plain

        with stage(R, "load"):
            from adapter_doctor.runtime import load

            model2, _ = load(adapter_dir)
            R["load"]["first_param_cuda"] = next(model2.parameters()).is_cuda
            R["load"]["base_dtypes"] = sorted({str(p.dtype) for n, p in model2.named_parameters()
                                               if "lora_" not in n})
            R["load"]["loss"], R["load"]["norms"] = lora_step(model2, batch)
            del model2

        with stage(R, "clean"):
            out = work / "clean.pt"
            proc = subprocess.run([sys.executable, "-c", CLEAN, base_dir, adapter_dir, resaved_dir, plain_dir,
                                   str(work / "batch.pt"), str(out)], env=env, capture_output=True, text=True,
                                  timeout=600, cwd=work)  # not the repository root: see test_scenario.clean_run
            assert proc.returncode == 0, proc.stderr[-4000:]
            clean = torch.load(out, weights_only=True)
            logits = clean.pop("logits")
            resaved, saved = logits["resaved"], logits["plain"]
            R["clean"] = {**clean, "logits_equal": torch.equal(resaved, saved),
                          "logits_max_diff": (resaved.float() - saved.float()).abs().max().item()}
        summary = json.dumps(R, separators=(",", ":"), default=str)
        print("\nUNSLOTH_RESULT " + summary)
        if os.environ.get("UNSLOTH_RESULT_JSON"):
            with open(os.environ["UNSLOTH_RESULT_JSON"], "w") as fh:
                fh.write(summary)
        yield R


def need(R, *stages):
    for name in stages:
        if name in R["errors"]:
            pytest.fail(f"stage {name!r} raised:\n{R['errors'][name]}", pytrace=False)


def crash_expected(R):
    # An unknown release is held to what it did: the inspector must still have predicted it.
    return PLAIN_RELOAD_CRASHES.get(R["versions"]["unsloth"], R["plain"]["step_error"] is not None)


def errors(found):
    return [f for f in found if f["severity"] == "error"]


def close(ours, ref, rel):
    return ours is not None and ref is not None and math.isclose(ours, ref, rel_tol=rel)


def test_model_from_fast_language_model_has_no_error_findings(run):
    need(run, "unsloth")
    assert not errors(run["unsloth"]["findings"]), run["unsloth"]["findings"]
    assert all(math.isfinite(x) for x in run["unsloth"]["train_losses"]), run["unsloth"]["train_losses"]


def test_inspector_predicts_the_plain_reload(run):
    need(run, "unsloth", "plain")
    found = errors(run["plain"]["findings"])
    if not crash_expected(run):
        assert not found, found
        return
    assert [f["id"] for f in found] == ["ADC901"], found
    message = found[0]["message"]
    named = all(re.search(rf"\b{attr}\b", message) for attr in ("apply_qkv", "apply_o"))
    assert "LlamaAttention" in message and named, message


def test_plain_training_step_behaves_as_the_release_does(run):
    need(run, "unsloth", "plain")
    error = run["plain"]["step_error"]
    if crash_expected(run):
        assert error is not None and "'LlamaAttention' object has no attribute 'apply_qkv'" in error, error
    else:
        assert error is None and math.isfinite(run["plain"]["step_loss"]), error


def test_ensure_patched_repairs_the_polluted_model(run):
    need(run, "unsloth", "plain", "patch")
    if crash_expected(run):
        assert run["plain"]["report"]["repaired"], run["plain"]["report"]
    assert not errors(run["plain"]["findings_after"]), run["plain"]["findings_after"]


def test_patched_step_matches_a_clean_process(run):
    need(run, "unsloth", "plain", "patch", "clean")
    ours, ref = run["plain"], run["clean"]
    assert close(ours["loss"], ref["loss"], 2e-2), (ours["loss"], ref["loss"])
    assert ours["norms"].keys() == ref["norms"].keys()
    bad = {n: (g, ref["norms"][n]) for n, g in ours["norms"].items() if not close(g, ref["norms"][n], 5e-2)}
    assert not bad, bad


def test_runtime_load_places_on_the_gpu_in_bf16_and_trains(run):
    need(run, "unsloth", "load", "clean")
    assert run["load"]["first_param_cuda"]
    assert run["load"]["base_dtypes"] == ["torch.bfloat16"], run["load"]["base_dtypes"]
    assert close(run["load"]["loss"], run["clean"]["loss"], 2e-2), (run["load"]["loss"], run["clean"]["loss"])


def test_resaved_adapter_gives_vanilla_peft_the_logits_of_a_plain_save(run):
    need(run, "unsloth", "plain", "patch", "clean")
    assert not run["clean"]["unsloth_imported"]  # the reference really is clean
    assert run["clean"]["logits_equal"], run["clean"]["logits_max_diff"]
