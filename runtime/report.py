"""PatchReport: what ensure_patched did to each module, as plain data (doctor/live.py turns it into findings)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

PATCHED, REPAIRED, RESTORED, ALREADY, SKIPPED, KEPT, UNSUPPORTED, BROKEN = (
    "patched", "repaired", "restored", "already patched", "skipped", "kept", "unsupported", "broken")


@dataclass
class ModuleAction:
    path: str  # "" is the model itself
    module_type: str  # the library class name
    action: str  # one of the constants above
    reason: str = ""  # why skipped / kept / unsupported / broken; for repaired or restored, what was missing
    implementation: str = ""  # ours, or "library" for a restored library forward or class
    replaced: str = ""  # the foreign forward that ran before, and its author


@dataclass
class Fallback:
    path: str  # the projection, e.g. model.layers.0.self_attn.q_proj
    reason: str  # why it runs as PEFT runs it instead of the fused kernel


@dataclass
class Projection:
    path: str  # every LoRA projection of a patched module, e.g. model.layers.0.mlp.down_proj
    path_taken: str  # "fused", "fused 4-bit nf4" (", double-quantized"), or "fallback"
    reason: str = ""  # for a fallback, why it runs as PEFT runs it


class PatchError(RuntimeError):
    """A module would be left broken, or strict=True and something supported was left unpatched; nothing was
    changed. `report` says what."""

    def __init__(self, report: PatchReport) -> None:
        super().__init__("; ".join(report.failures))
        self.report = report


@dataclass
class PatchReport:
    model_type: str | None
    kernels: str
    version: str
    strict: bool = False
    modules: list[ModuleAction] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    projections: list[Projection] = field(default_factory=list)  # the fused ones and the fallbacks, in order

    def _with(self, action: str) -> list[ModuleAction]:
        return [m for m in self.modules if m.action == action]

    @property
    def supported(self) -> bool:
        return not self._with(UNSUPPORTED)

    # The modules that met each action, e.g. report.repaired.
    patched = property(lambda self: self._with(PATCHED))
    repaired = property(lambda self: self._with(REPAIRED))
    restored = property(lambda self: self._with(RESTORED))
    kept = property(lambda self: self._with(KEPT))
    already_patched = property(lambda self: self._with(ALREADY))
    skipped = property(lambda self: self._with(SKIPPED))
    broken = property(lambda self: self._with(BROKEN))

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """module type -> action -> how many."""
        out: dict[str, Counter] = {}
        for m in self.modules:
            out.setdefault(m.module_type, Counter())[m.action] += 1
        return {kind: dict(c) for kind, c in sorted(out.items())}

    @property
    def failures(self) -> list[str]:
        """What strict=True refuses: an unsupported model, supported modules left unpatched, broken modules."""
        return [f"{m.path or '(model)'} ({m.module_type}): {m.action}{': ' + m.reason if m.reason else ''}"
                for m in self.modules if m.action in (SKIPPED, UNSUPPORTED, BROKEN)]

    @property
    def changed(self) -> int:
        return len(self.patched) + len(self.repaired) + len(self.restored)
