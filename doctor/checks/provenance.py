"""Provenance written by adapter-doctor's runtime, compared with the base and versions found here."""
from __future__ import annotations

from typing import Iterator

from ..finding import Finding, Severity
from ..knowledge import parse_version
from ..provenance import Provenance, base_fields, fingerprint
from . import Check, Context, register, runner

MISMATCH = Check(
    "ADC309", "base-model", Severity.ERROR, "The base is not the one the adapter was saved with",
    "adapter-doctor's runtime records a fingerprint of the base (architecture fields and the shapes of the adapted "
    "modules). The base found here has another: a different model, size or vocabulary.",
    manual="Load the adapter onto the base it was saved with.")
CONTEXT = Check(
    "ADC310", "base-model", Severity.WARNING, "Trained at a longer context than the base allows",
    "The adapter was saved from a run with a max_seq_length above the base's max_position_embeddings: the run "
    "extended the context (RoPE scaling), which loading the plain base does not do.",
    manual="Load with adapter_doctor.runtime.load(..., max_seq_length=N), or set the same rope scaling.")
MAJOR = Check(
    "ADC853", "environment", Severity.WARNING, "Saved under another transformers major version",
    "Module layouts change between transformers majors (fused MoE experts in 5.0); the adapter was saved under "
    "another major than the one it is judged against here.", manual="Check keys-unmatched findings, or pass --target-transformers.")
SAVED_BY = Check(
    "ADC311", "base-model", Severity.INFO, "Saved by adapter-doctor's runtime",
    "The weights carry provenance: the runtime and library versions, the patch set and the base fingerprint.")
UNSLOTH = Check(
    "ADC312", "patch", Severity.INFO, "Saved by Unsloth",
    "Unsloth marks its adapters with auto_mapping.unsloth_fixed. The files are plain PEFT, but in a process where "
    "Unsloth's loader has run, its class-level patches break models loaded any other way (AttributeError: ... "
    "'apply_qkv'). Reload it with adapter_doctor.runtime.load(), or call ensure_patched(model) after loading.")
register(MISMATCH, CONTEXT, MAJOR, SAVED_BY, UNSLOTH)


@runner
def check(ctx: Context) -> Iterator[Finding]:
    auto = (ctx.artifact.config or {}).get("auto_mapping")
    if isinstance(auto, dict) and auto.get("unsloth_fixed"):
        yield UNSLOTH.finding("auto_mapping.unsloth_fixed is true", ctx.config_file("auto_mapping"))
    primary = ctx.artifact.primary_weights
    prov = Provenance.from_metadata(primary.header.metadata if primary and primary.header else None)
    if prov is None:
        return
    where = f"{primary.path}#__metadata__"
    yield SAVED_BY.finding(f"adapter-doctor {prov.runtime}, transformers {prov.versions.get('transformers', '?')}, "
                           f"PEFT {prov.versions.get('peft', '?')}, patches {prov.patch_set}", where)
    saved, here = parse_version(prov.versions.get("transformers", "")), parse_version(ctx.env.transformers or "")
    if saved and here and saved.major != here.major:
        yield MAJOR.finding(f"saved under transformers {saved}; judged against {here}", where)
    base = ctx.base
    if base is None:
        return
    modules = {k.module for k in ctx.artifact.keys.values() if k.role.startswith("lora_")}
    dims = {m: (base.modules[m].in_features, base.modules[m].out_features) for m in modules
            if m in base.modules and base.modules[m].kind != "experts"}
    if fingerprint(base.config, dims) != prov.base_fingerprint:
        now = base_fields(base.config)
        differ = sorted(k for k in set(now) | set(prov.base_config) if now.get(k) != prov.base_config.get(k))
        detail = ", ".join(f"{k} {prov.base_config.get(k)} -> {now.get(k)}" for k in differ) or "the adapted modules' shapes"
        yield MISMATCH.finding(f"the base at {base.path} differs from the one it was saved with: {detail}", where)
    limit = base.text_config.get("max_position_embeddings")
    if prov.max_seq_length and isinstance(limit, int) and prov.max_seq_length > limit:
        yield CONTEXT.finding(f"saved with max_seq_length {prov.max_seq_length}; the base allows {limit}", where)
