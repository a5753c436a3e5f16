"""weights-missing, weights-corrupt, weights-unsafe: is there a weights file, is it intact, is it safe to load?"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from ..artifact import WeightsFile
from ..finding import Finding, Fix, Severity, sample
from ..peft_load import safetensors_strands
from ..tensor_data import TensorDataError, tensor_digests
from . import Check, Context, register, runner

NONE = Check(
    "ADC401", "weights-missing", Severity.ERROR, "No adapter weights",
    "PEFT looks for adapter_model.safetensors, then adapter_model.bin. Without either it tries the Hub and fails "
    "(`OSError ... does not appear to have a file named adapter_model.safetensors`).",
    manual="Copy the weights next to adapter_config.json.")
LFS = Check(
    "ADC402", "weights-missing", Severity.ERROR, "The weights file is a Git LFS pointer",
    "The repository stored the weights in Git LFS and this clone holds only the pointer text. safetensors reports "
    "it as `HeaderTooLarge`, which hides the real cause.", manual="Install git-lfs and run `git lfs pull`.")
PLACEHOLDER = Check(
    "ADC403", "weights-missing", Severity.ERROR, "The weights file is empty or a text placeholder",
    "The file has the right name but holds no weights: it is empty, or a short text (a placeholder, an HTML error "
    "page saved by a failed download).", manual="Download or copy the real weights.")
CORRUPT = Check(
    "ADC411", "weights-corrupt", Severity.ERROR, "The safetensors file is invalid",
    "The header or the byte layout breaks the safetensors format: a truncated or interrupted download, trailing "
    "bytes, overlapping or missing tensor data, an unknown dtype. safetensors refuses to load it.",
    manual="Download or copy the file again and compare its size with the source.")
BAD_PICKLE = Check(
    "ADC412", "weights-corrupt", Severity.ERROR, "The pickled weights file is damaged",
    "The .bin file is not a readable torch archive or pickle (truncated, or not a pickle at all).",
    manual="Download or copy the file again.")
DIFFER = Check(
    "ADC413", "weights-corrupt", Severity.WARNING, "adapter_model.bin and adapter_model.safetensors differ",
    "PEFT loads the safetensors file and ignores the .bin. When they disagree, one of them is stale, and tools that "
    "prefer .bin load a different adapter.", manual="Delete the stale file after checking which one is current.")
DANGEROUS = Check(
    "ADC421", "weights-unsafe", Severity.ERROR, "The pickle would run code when loaded",
    "Unpickling calls the functions a pickle names. This file names functions that run commands or import "
    "arbitrary code. Never load it with torch.load(weights_only=False).", manual="Delete it; do not load it.")
UNKNOWN_GLOBALS = Check(
    "ADC422", "weights-unsafe", Severity.ERROR, "The pickle imports objects outside the tensor allow-list",
    "A weights pickle needs only torch's tensor-rebuild functions and storage classes. Anything else makes "
    "`torch.load(weights_only=True)` (PEFT's loader) refuse the file, and could run code if loaded unsafely.",
    manual="Convert it in a sandbox you trust, or get the weights as safetensors.")
REFUSED = Check(
    "ADC424", "weights-unsafe", Severity.ERROR, "The weights file may load something other than what was scanned",
    "torch.load would run code the opcode scan cannot vouch for: TorchScript (run by torch.jit.load), a legacy tar "
    "archive, pickles besides data.pkl, or a zip whose members another reader resolves differently (names that "
    "differ only in case, duplicates, several top folders, local headers that disagree with the central directory).",
    manual="Delete it; do not load it. Ask for the weights as safetensors.")
NO_TENSORS = Check(
    "ADC404", "weights-missing", Severity.ERROR, "The weights file holds no tensors",
    "A valid safetensors file whose header lists no tensors (`{}`, or only `__metadata__`). PEFT loads it without an "
    "error: every LoRA layer keeps lora_B = 0 (PEFT 0.14+ only warns `Found missing adapter keys`), so the adapter "
    "is a no-op. Usually the save ran before training, on the wrong model object, or under ZeRO-3 without gathering.",
    manual="Re-save the adapter from the trained model.")
PICKLE = Check(
    "ADC423", "weights-unsafe", Severity.WARNING, "Weights are a pickle (.bin), not safetensors",
    "The opcode scan passed: the file holds only tensors. Pickles still need torch to read, load slower, and cannot "
    "be checked by safetensors tooling; transformers refuses them on torch < 2.6 (CVE-2025-32434).",
    fixer="pickle-to-safetensors")
register(NONE, NO_TENSORS, LFS, PLACEHOLDER, CORRUPT, BAD_PICKLE, DIFFER, DANGEROUS, UNKNOWN_GLOBALS, REFUSED, PICKLE)


@runner
def check(ctx: Context) -> Iterator[Finding]:
    art = ctx.artifact
    if art.kind == "config-only" or ctx.not_peft:
        return
    if not art.weights:
        yield NONE.finding(f"no adapter_model.safetensors or adapter_model.bin in {art.root}", str(art.root))
        return
    pair = {wf.path.suffix: wf for wf in art.weights}
    if ctx.peft_type is not None:
        yield from _no_tensors(ctx, pair.get(".safetensors"))
    for wf in art.weights:
        # PEFT loads the safetensors twin when both exist; the .bin then matters only if unsafe or different.
        for f in _file_findings(wf, shadowed=wf.path.suffix != ".safetensors" and ".safetensors" in pair):
            yield _kept_bin(ctx, f) if f.id == PICKLE.id else f
    if ".safetensors" in pair and ".bin" in pair:
        yield from _compare(ctx, pair[".safetensors"], pair[".bin"])


def _no_tensors(ctx: Context, wf: WeightsFile | None) -> Iterator[Finding]:
    if wf is None or wf.format != "safetensors" or wf.problem or wf.header is None or wf.header.tensors:
        return
    config = ctx.artifact.config or {}
    targets = [config.get(k) for k in ("target_modules", "target_parameters", "modules_to_save")]
    named = sum(len(t) if isinstance(t, list) else 1 for t in targets if t)
    what = f"the config selects {named} module name(s)" if named else f"the config is a {ctx.peft_type} adapter"
    yield NO_TENSORS.finding(f"{wf.path.name} ({wf.size:,} bytes) has an empty tensor index, but {what}: PEFT loads "
                             "nothing, and the adapter does nothing", str(wf.path))


def _kept_bin(ctx: Context, f: Finding) -> Finding:
    # The conversion is not offered where it would leave no PEFT release that loads the adapter.
    stranded = safetensors_strands(ctx.artifact.config or {}, ctx.peft_type, ctx.target_release)
    return replace(f, fix=Fix(None, f"Keep the .bin: {stranded}")) if stranded else f


def _file_findings(wf: WeightsFile, shadowed: bool) -> Iterator[Finding]:
    where = str(wf.path)
    if wf.format == "lfs-pointer":
        size = f" (the real file is {wf.lfs.size:,} bytes)" if wf.lfs and wf.lfs.size else ""
        yield LFS.finding(f"{wf.path.name} is a {wf.size}-byte Git LFS pointer{size}", where)
    elif wf.format in ("empty", "text"):
        yield PLACEHOLDER.finding(f"{wf.path.name}: {wf.problem}", where)
    elif wf.format == "safetensors" and wf.problem:
        yield CORRUPT.finding(f"{wf.path.name} ({wf.size:,} bytes): {wf.problem}", where)
    elif wf.pickle is not None:
        yield from _pickle_findings(wf, where, shadowed)


def _pickle_findings(wf: WeightsFile, where: str, shadowed: bool) -> Iterator[Finding]:
    scan = wf.pickle
    if scan.dangerous:
        yield DANGEROUS.finding(f"{wf.path.name} imports {', '.join(scan.dangerous)}", where)
    others = [g for g in scan.unsafe if g not in scan.dangerous]
    if others:
        yield UNKNOWN_GLOBALS.finding(f"{wf.path.name} imports {', '.join(others)}", where)
    if scan.refused:
        yield REFUSED.finding(f"{wf.path.name}: {scan.refused}", where)
    # Damage matters only in a file that could be loaded; a walk cut short by a bound is both.
    if scan.error and (scan.unverified or not (scan.unsafe or scan.refused)):
        yield BAD_PICKLE.finding(f"{wf.path.name} ({wf.size:,} bytes): {scan.error}", where)
    elif scan.passed and scan.tensors is None:
        yield BAD_PICKLE.finding(f"{wf.path.name} holds a pickled object that is not a dict of tensors", where,
                                 title="The pickle is not a state dict")
    elif scan.passed and not scan.tensors:
        yield BAD_PICKLE.finding(f"{wf.path.name} holds a dict without tensors (entries: {sample(scan.other_entries, 3)})",
                                 where, title="The pickle holds no tensors")
    elif scan.passed and not shadowed:
        extra = f"; it also holds non-tensor entries {sample(scan.other_entries, 3)}" if scan.other_entries else ""
        yield PICKLE.finding(f"{wf.path.name}: {len(scan.tensors)} tensors, {scan.format} format{extra}", where)


def data_finding(wf: WeightsFile, exc: TensorDataError) -> Finding:
    """The tensor bytes of `wf` could not be read as its index says: damage, or data that expands too far."""
    check = CORRUPT if wf.header is not None else BAD_PICKLE
    message = f"{wf.path.name} ({wf.size:,} bytes): {exc}"
    if exc.kind == "expands":
        return check.finding(message, str(wf.path), severity=Severity.WARNING,
                             title="Tensor data too large for its file to scan")
    return check.finding(message, str(wf.path), title="The tensor data cannot be read")


def _compare(ctx: Context, st: WeightsFile, pt: WeightsFile) -> Iterator[Finding]:
    a, b = st.tensors, pt.tensors
    if a is None or b is None:
        return
    where = str(pt.path)
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        yield DIFFER.finding(f"they hold different tensor names ({len(only)} differ, e.g. {only[0]})", where)
        return
    shapes = [n for n in a if (a[n].shape, a[n].dtype) != (b[n].shape, b[n].dtype)]
    if shapes:
        n = shapes[0]
        yield DIFFER.finding(f"{n}: {a[n].dtype} {list(a[n].shape)} vs {b[n].dtype} {list(b[n].shape)}", where)
        return
    if ctx.scan_values:
        try:
            data_a, data_b = tensor_digests(st), tensor_digests(pt)
        except TensorDataError as exc:
            yield data_finding(pt, exc)
            return
        changed = [n for n in a if data_a.get(n) != data_b.get(n)]
        if changed:
            yield DIFFER.finding(f"{len(changed)} tensor(s) hold different values, e.g. {changed[0]}", where)
        else:
            yield PICKLE.finding("adapter_model.bin duplicates adapter_model.safetensors exactly; it can go",
                                 where, severity=Severity.INFO, title="A redundant .bin copy",
                                 fix=Fix(None, "Delete adapter_model.bin"))
