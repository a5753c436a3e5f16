"""environment: facts about the installed libraries that decide whether this adapter loads here."""
from __future__ import annotations

from typing import Iterator

from ..env import installed_version
from ..finding import Finding, Severity
from ..knowledge import behaviours, parse_version
from . import Check, Context, register, runner

CAT = "environment"
OLD_TORCH_BIN = Check(
    "ADC851", CAT, Severity.WARNING, "Pickled weights with torch < 2.6",
    "Because of CVE-2025-32434, transformers refuses `torch.load` on torch older than 2.6 (\"Due to a serious "
    "vulnerability issue in torch.load...\"). safetensors files are exempt.",
    fixer="pickle-to-safetensors")
PAIR = Check(
    "ADC852", CAT, Severity.ERROR, "These transformers and PEFT versions do not work together",
    "transformers 5 requires PEFT 0.18 or later for adapters (MIN_PEFT_VERSION in its PEFT integration); older "
    "PEFT releases break on its new weight loading.", manual="pip install -U 'peft>=0.18'")
register(OLD_TORCH_BIN, PAIR)


def incompatible_pairs(versions: dict[str, str | None]) -> list[str]:
    """Human descriptions of known-bad version combinations among `versions`."""
    out = []
    for rule in behaviours()["requirements"]:
        if all(_satisfies(versions.get(lib), spec) for lib, spec in rule["when"].items()):
            for lib, spec in rule["needs"].items():
                have = versions.get(lib)
                if have and not _satisfies(have, spec):
                    when = ", ".join(f"{lib} {versions[lib]}" for lib in rule["when"])
                    out.append(f"{when} needs {lib} {spec}, but {lib} is {have} ({rule['why']})")
    return out


def _satisfies(version: str | None, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet  # rarely needed; keeps `doctor check` quick to start

    parsed = parse_version(version or "")
    return parsed is not None and SpecifierSet(spec).contains(parsed, prereleases=True)


@runner
def check(ctx: Context) -> Iterator[Finding]:
    art = ctx.artifact
    primary = art.primary_weights
    torch, need = installed_version("torch"), behaviours()["pickle_weights_need"]["torch"]
    if primary is not None and primary.pickle is not None and torch and not _satisfies(torch, need):
        yield OLD_TORCH_BIN.finding(f"torch {torch} is installed; transformers will refuse {primary.path.name}", str(primary.path))
    for problem in incompatible_pairs({"transformers": ctx.env.transformers, "peft": ctx.env.peft}):
        yield PAIR.finding(problem, str(art.root))
