"""Plot the GPU convergence test's loss curves (HF+PEFT and ours) and their per-step relative difference.

    CONVERGENCE_OUT=bench/results/convergence.json pytest -m gpu tests/runtime/test_convergence_gpu.py
    python bench/plot_convergence.py bench/results/convergence.json bench/results/convergence.png

Needs matplotlib (`pip install matplotlib`); nothing else in the project does.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("curves", type=Path, help="the JSON the test wrote")
    parser.add_argument("png", type=Path)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(args.curves.read_text())
    reference, ours = data["hf_peft"], data["ours"]
    steps = range(1, len(reference) + 1)
    relative = [100 * (o - r) / r for o, r in zip(ours, reference)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    top.plot(steps, reference, label="HF + PEFT", linewidth=2.5, alpha=0.6)
    top.plot(steps, ours, label="adapter-doctor runtime", linewidth=1)
    top.set_ylabel("training loss")
    top.set_title(f"LoRA r16, 1B-shape Llama (random init), seq {data['seq']} x batch {data['batch']}, "
                  f"{data['device']}", fontsize=9)
    top.legend()
    bottom.plot(steps, relative, color="black", linewidth=0.8)
    bottom.axhspan(-1, 1, color="green", alpha=0.1, label="±1%")
    bottom.set_ylabel("ours vs HF, %")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
