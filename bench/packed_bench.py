"""LoRA fine-tuning on documents of realistic lengths, packed or padded, timed in this process: one JSON line.

    python bench/packed_bench.py --size 8b --variant ours --layout packed [--gc] [--checkpoint DIR]

The documents are SFT-like: lengths drawn from a log-normal with median 300 tokens (mu = ln 300, sigma = 1.0,
so a mean of about 495 and a long tail), rounded, floored at 16 and capped at 4,096; tokens uniform random.
Seed 0 draws the timed set (the first documents whose lengths reach --tokens), seed 1 the warm-up set. Every
variant trains on the whole timed set, in order, in one of two layouts:

- `packed`: rows of at most --budget tokens (16,384), documents added in order while they fit, one row a step;
  `position_ids` restart at each document and each document's first token is no target (-100), as
  transformers' `DataCollatorWithFlattening` builds them; no attention mask.
- `padded`: batches taken in order while count x longest <= --budget, right-padded to the longest, with the
  attention mask and -100 labels on the padding, as `DataCollatorForSeq2Seq` pads them.

Both layouts hold the same targets (every document's tokens after its first). `tok_s` counts real tokens only.
Variants are train_bench's: `hf` and `liger` run padded, as their users run them (packed rows need attention
that keeps the documents apart); `ours` and `unsloth` run either layout (Unsloth reads the document
boundaries of a one-row batch from its restarting `position_ids`, as we do). --gc as in train_bench.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SIZES, emit, timed, training_step, versions  # noqa: E402
from train_bench import VARIANTS, prepare  # noqa: E402

MEDIAN, SIGMA, FLOOR, CAP = 300, 1.0, 16, 4096
IGNORE = -100


def lengths(total: int, seed: int) -> list[int]:
    """Document lengths of the seeded log-normal, until they sum to at least `total`."""
    import random

    draw, out = random.Random(seed), []
    while sum(out) < total:
        out.append(min(CAP, max(FLOOR, round(draw.lognormvariate(math.log(MEDIAN), SIGMA)))))
    return out


def documents(total: int, seed: int, vocab: int) -> list[list[int]]:
    import random

    draw = random.Random(seed + 1000)
    return [[draw.randrange(4, vocab) for _ in range(n)] for n in lengths(total, seed)]


def packed(docs: list[list[int]], budget: int) -> list[dict]:
    """One row of at most `budget` tokens a step, documents in order."""
    import torch

    rows: list[list[list[int]]] = [[]]
    for doc in docs:
        if rows[-1] and sum(map(len, rows[-1])) + len(doc) > budget:
            rows.append([])
        rows[-1].append(doc)
    batches = []
    for row in rows:
        ids = torch.tensor([t for doc in row for t in doc]).unsqueeze(0)
        positions = torch.cat([torch.arange(len(doc)) for doc in row]).unsqueeze(0)
        labels = ids.clone()
        labels[positions == 0] = IGNORE  # no target crosses a document boundary
        batches.append({"input_ids": ids, "position_ids": positions, "labels": labels})
    return batches


def padded(docs: list[list[int]], budget: int, pad: int = 0) -> list[dict]:
    """Batches in order while count x longest <= `budget`, right-padded to the longest."""
    import torch

    groups: list[list[list[int]]] = [[]]
    for doc in docs:
        if groups[-1] and (len(groups[-1]) + 1) * max(len(doc), *map(len, groups[-1])) > budget:
            groups.append([])
        groups[-1].append(doc)
    batches = []
    for group in groups:
        width = max(map(len, group))
        ids = torch.full((len(group), width), pad)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, doc in enumerate(group):
            ids[i, :len(doc)], mask[i, :len(doc)] = torch.tensor(doc), 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)})
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--layout", choices=["packed", "padded"], required=True)
    parser.add_argument("--checkpoint", type=Path, help="the base on disk (needed by unsloth)")
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing (ours and unsloth: offloaded)")
    parser.add_argument("--budget", type=int, default=16384, help="tokens (packed) or padded slots a step")
    parser.add_argument("--tokens", type=int, default=98304, help="real tokens in the timed set")
    args = parser.parse_args()
    if args.layout == "packed" and args.variant in ("hf", "liger"):
        raise SystemExit(f"--variant {args.variant} runs --layout padded only")
    if args.variant == "unsloth":  # before anything imports transformers
        import unsloth  # noqa: F401
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, patched = prepare(args.variant, args.size, args.gc, device, args.checkpoint, args.budget)
    layout = packed if args.layout == "packed" else padded
    vocab = model.config.vocab_size
    timed_docs, warm_docs = documents(args.tokens, 0, vocab), documents(2 * args.budget, 1, vocab)

    step = training_step(model, lambda batch: {**{k: v.to(device, non_blocking=True) for k, v in batch.items()},
                                               "use_cache": False})

    batches = layout(timed_docs, args.budget)
    real = sum(map(len, timed_docs))
    slots = sum(b["input_ids"].numel() for b in batches)
    result = timed(step, layout(warm_docs, args.budget)[:3], batches, real)
    emit({"size": args.size, "variant": args.variant, "layout": args.layout, "gc": args.gc, "kernels": patched,
          "documents": len(timed_docs), "real_tokens": real, "slots": slots, "fill": round(real / slots, 3),
          "steps": len(batches), "budget": args.budget, **result,
          "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", **versions(), "pid": os.getpid()})


if __name__ == "__main__":
    main()
