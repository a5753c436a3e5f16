"""Cross-check the MoE layout conversion against the transformers version each layout belongs to.

Per-expert adapters are what transformers 4 loads natively, fused ones what transformers 5 loads
natively, so each conversion is checked where its output really runs:

* qwen3_moe: the fused fixture in transformers 5 (this interpreter) against its per-expert conversion
  in transformers 4.57 + PEFT 0.17.1 (the `--v4-python` interpreter);
* mixtral, plain and with use_rslora: the per-expert fixture in transformers 4.57 against its fused
  conversion in transformers 5, and against PEFT's own fusing on load ("PEFT on load").

Both sides use the same base folder (its files keep the per-expert key layout, which both versions
read), float32 and the same token ids. Columns are max |logit difference| from the source adapter run
where it belongs; "base floor" compares the base model alone across the two versions, the limit set by
their own MoE code; "adapter effect" is how far the source moves the logits from its base.

    .venv/bin/python bench/moe_layout_crosscheck.py [--v4-python /tmp/fx-v4/bin/python]

Measured (CPU, torch 2.13, transformers 5.24 / 4.57.6, PEFT 0.21.2 / 0.17.1):

    case                      converted  PEFT on load  base floor  adapter effect  max |logit|
    qwen3_moe v5 -> v4        1.192e-07             -   8.941e-08       4.361e-01        0.481
    mixtral v4 -> v5          1.192e-07     1.192e-07   5.960e-08       3.102e-01        0.452
    mixtral rslora v4 -> v5   1.192e-07     1.333e-01   5.960e-08       5.238e-01        0.461

PEFT 0.21.2 fuses gate/up at rank 2r with alpha 2*alpha, which keeps alpha/r but not rsLoRA's
alpha/sqrt(r): its on-load conversion scales those experts by sqrt(2) too much.

CI never runs this.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # name: (base, source adapter, edits to its config, conversion, the side the source belongs to)
    "qwen3_moe v5 -> v4": ("fixtures/bases/qwen3_moe", "fixtures/healthy/qwen3moe-v5-target-parameters", {},
                           "fused_to_per_expert", "v5"),
    "mixtral v4 -> v5": ("fixtures/bases/mixtral", "fixtures/healthy/v4/mixtral-per-expert", {},
                         "per_expert_to_fused", "v4"),
    "mixtral rslora v4 -> v5": ("fixtures/bases/mixtral", "fixtures/healthy/v4/mixtral-per-expert",
                                {"use_rslora": True}, "per_expert_to_fused", "v4"),
}


def logits(base: str, adapter: str | None, ids: list[list[int]]) -> list:
    """Float32 logits of `adapter` (None: the base alone) on `base`, in whichever transformers runs this."""
    import torch
    import transformers
    from peft import PeftModel

    config = transformers.AutoConfig.from_pretrained(base)
    saved = json.loads((ROOT / base / "config.json").read_text())
    if config.model_type == "qwen3_moe" and "num_experts" not in saved:
        config.num_experts = saved["num_local_experts"]  # 5.x saves this name; 4.57 reads num_experts (default 128)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, config=config, torch_dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.tolist()


def run_child(job: Path) -> None:
    spec = json.loads(job.read_text())
    out = {key: logits(base, adapter, spec["ids"]) for key, (base, adapter) in spec["runs"].items()}
    job.with_suffix(".out.json").write_text(json.dumps(out))


def write(folder: Path, tensors: dict, config: dict) -> Path:
    from adapter_doctor.fixers.tensors import write_tensors

    folder.mkdir(parents=True)
    write_tensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def prepare(case: tuple, folder: Path) -> tuple[str, str]:
    """The (edited) source adapter and its conversion, written under `folder`."""
    from adapter_doctor.fixers import moe_layout
    from adapter_doctor.fixers.tensors import read_tensors

    base, source, edits, name, _ = case
    tensors, _ = read_tensors(ROOT / source / "adapter_model.safetensors")
    config = {**json.loads((ROOT / source / "adapter_config.json").read_text()), **edits}
    converted = getattr(moe_layout, name)(tensors, config, json.loads((ROOT / base / "config.json").read_text()))
    return str(write(folder / "source", tensors, config)), str(write(folder / "converted", *converted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v4-python", default="/tmp/fx-v4/bin/python")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child)
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 128, (4, 32)).tolist()
    work = Path(tempfile.mkdtemp(prefix="moe-crosscheck-"))
    runs: dict[str, dict[str, tuple[str, str | None]]] = {"v4": {}, "v5": {}}
    for label, case in CASES.items():
        base, _, _, _, side = case
        source, converted = prepare(case, work / label.replace(" ", "_").replace(">", ""))
        other = "v5" if side == "v4" else "v4"
        runs[side][label + " source"] = (base, source)
        runs[other][label + " converted"] = (base, converted)
        if side == "v4":  # PEFT >= 0.19 also fuses mixtral adapters itself when transformers 5 loads them
            runs["v5"][label + " peft-on-load"] = (base, source)
        for each in ("v4", "v5"):
            runs[each][f"{label} base {each}"] = (base, None)
    job = work / "v4.json"
    job.write_text(json.dumps({"ids": ids, "runs": runs["v4"]}))
    subprocess.run([args.v4_python, __file__, "--child", str(job)], cwd=ROOT, check=True)
    got = {**json.loads(job.with_suffix(".out.json").read_text())}
    got.update({key: logits(base, adapter, ids) for key, (base, adapter) in runs["v5"].items()})
    got = {key: np.array(value) for key, value in got.items()}
    print(f"{'case':24} {'converted':>10} {'PEFT on load':>13} {'base floor':>11} {'adapter effect':>15} "
          f"{'max |logit|':>12}")
    for label, case in CASES.items():
        source = got[label + " source"]
        diff = {k: f"{np.abs(source - got[label + k]).max():.3e}" if label + k in got else "-"
                for k in (" converted", " peft-on-load")}
        print(f"{label:24} {diff[' converted']:>10} {diff[' peft-on-load']:>13} "
              f"{np.abs(got[label + ' base v4'] - got[label + ' base v5']).max():11.3e} "
              f"{np.abs(source - got[f'{label} base {case[4]}']).max():15.3e} {np.abs(source).max():12.3f}")


if __name__ == "__main__":
    main()
