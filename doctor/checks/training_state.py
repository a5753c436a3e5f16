"""training-state: can training resume from this Trainer checkpoint folder?"""
from __future__ import annotations

import json
from typing import Iterator

from ..finding import Finding, Severity
from . import Check, Context, register, runner

CAT = "training-state"
INCOMPLETE = Check(
    "ADC801", CAT, Severity.WARNING, "The checkpoint lacks what a resume needs",
    "`Trainer.train(resume_from_checkpoint=...)` reads trainer_state.json (it fails without it) and restores the "
    "optimizer and scheduler from optimizer.pt and scheduler.pt; when those are missing it silently starts them "
    "fresh, which changes the run. rng_state*.pth makes data order and dropout reproducible.",
    manual="Resume from a complete checkpoint, or treat this one as an adapter and start a new run.")
RESUMABLE = Check(
    "ADC802", CAT, Severity.INFO, "The checkpoint can resume training",
    "The folder holds the adapter, optimizer, scheduler, trainer state and RNG state that a resume needs.")
BAD_STATE = Check(
    "ADC803", CAT, Severity.WARNING, "trainer_state.json is unreadable",
    "The Trainer reads the step count, logs and best-model path from trainer_state.json; resuming fails without it.",
    manual="Restore trainer_state.json from the run.")
register(INCOMPLETE, RESUMABLE, BAD_STATE)

_NEEDED = {
    "trainer_state.json": "the step count and logs (resume fails without it)",
    "optimizer.pt": "the optimizer state (AdamW moments restart from zero without it)",
    "scheduler.pt": "the LR scheduler state (the schedule restarts without it)",
}


@runner
def check(ctx: Context) -> Iterator[Finding]:
    art = ctx.artifact
    if art.kind != "checkpoint":
        return
    files = art.files
    missing = [f"{name}: {why}" for name, why in _NEEDED.items() if name not in files]
    if not any(n.startswith("rng_state") for n in files):
        missing.append("rng_state.pth: the RNG state (data order and dropout differ after resume)")
    if missing:
        yield INCOMPLETE.finding("missing " + "; ".join(missing), str(art.root))
        return
    step = _global_step(art.root / "trainer_state.json")
    if step is None:
        yield BAD_STATE.finding(f"{art.root / 'trainer_state.json'} has no readable global_step", str(art.root / "trainer_state.json"))
        return
    yield RESUMABLE.finding(f"resumable from global step {step}", str(art.root))


def _global_step(path) -> int | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else None
