"""environment: facts about the installed libraries that decide whether this adapter loads here."""
from __future__ import annotations

from typing import Iterator

from ..env import installed_version
from ..finding import Finding, Severity
from ..knowledge import parse_version
from . import Check, Context, register, runner

CAT = "environment"
OLD_TORCH_BIN = Check(
    "ADC851", CAT, Severity.WARNING, "Pickled weights with torch < 2.6",
    "Because of CVE-2025-32434, transformers refuses `torch.load` on torch older than 2.6 (\"Due to a serious "
    "vulnerability issue in torch.load...\"). safetensors files are exempt.",
    fixer="pickle-to-safetensors")
PAIR = Check(
    "ADC852", CAT, Severity.ERROR, "Installed transformers and PEFT do not work together",
    "transformers 5 requires PEFT 0.18 or later for adapters (MIN_PEFT_VERSION in its PEFT integration); older "
    "PEFT releases break on its new weight loading.", manual="pip install -U 'peft>=0.18'")
register(OLD_TORCH_BIN, PAIR)


def incompatible_pairs(versions: dict[str, str | None]) -> list[str]:
    """Human descriptions of known-bad version combinations among `versions`."""
    tf, peft = parse_version(versions.get("transformers") or ""), parse_version(versions.get("peft") or "")
    out = []
    if tf is not None and peft is not None and tf.major >= 5 and peft < parse_version("0.18.0"):
        out.append(f"transformers {tf} needs PEFT >= 0.18, but PEFT {peft} is installed")
    return out


@runner
def check(ctx: Context) -> Iterator[Finding]:
    art = ctx.artifact
    primary = art.primary_weights
    torch = parse_version(installed_version("torch") or "")
    if primary is not None and primary.pickle is not None and torch is not None and torch < parse_version("2.6"):
        yield OLD_TORCH_BIN.finding(f"torch {torch} is installed; transformers will refuse {primary.path.name}", str(primary.path))
    if ctx.env.peft_source == "installed" and ctx.env.transformers_source == "installed":
        for problem in incompatible_pairs({"transformers": ctx.env.transformers, "peft": ctx.env.peft}):
            yield PAIR.finding(problem, str(art.root))
