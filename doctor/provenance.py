"""Provenance of a saved adapter: what saved it, with which patches, for which base.

It lives in the safetensors header's `__metadata__` (a string-to-string map), never in
adapter_config.json, where a new key would make PEFT < 0.14 raise TypeError. This module needs no torch:
the doctor reads it back when it checks files. It imports nothing of ours, so that the runtime, which writes it,
and the checks, which read it, share one format without importing each other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

PREFIX = "adapter_doctor."
# The config fields that decide module names and shapes: two bases that agree on these (and on the shapes of
# the adapted modules) accept the same adapter.
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "vocab_size", "moe_intermediate_size", "num_experts",
                      "num_local_experts", "tie_word_embeddings")


def runtime_version() -> str:
    """This package's version, from its installed metadata (read here, not from the package root, so that
    importing this module runs nothing else of ours)."""
    from importlib import metadata

    return metadata.version("adapter-doctor")


def base_fields(config: dict) -> dict:
    """The fingerprinted fields of a (possibly multimodal) config, from its text config where it has one."""
    nested = config.get("text_config")
    text = nested if isinstance(nested, dict) else config
    return {k: text[k] for k in FINGERPRINT_FIELDS if k in text and text[k] is not None}


def fingerprint(config: dict, modules: dict[str, tuple[int | None, int | None]]) -> str:
    """A short hash of the base's architecture fields and the (in, out) features of the adapted modules."""
    payload = {"config": base_fields(config), "modules": sorted([p, *dims] for p, dims in modules.items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Provenance:
    runtime: str
    versions: dict[str, str]  # torch, transformers, peft
    patch_set: dict  # kernel set and patched module counts
    max_seq_length: int | None
    base_fingerprint: str
    base_config: dict

    def to_metadata(self) -> dict[str, str]:
        meta = {f"{PREFIX}runtime": self.runtime, f"{PREFIX}patch_set": json.dumps(self.patch_set, sort_keys=True),
                f"{PREFIX}base_fingerprint": self.base_fingerprint,
                f"{PREFIX}base_config": json.dumps(self.base_config, sort_keys=True)}
        meta |= {f"{PREFIX}{lib}": v for lib, v in self.versions.items()}
        if self.max_seq_length is not None:
            meta[f"{PREFIX}max_seq_length"] = str(self.max_seq_length)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None) -> "Provenance | None":
        """The provenance a file carries, or None (not saved by adapter-doctor, or damaged)."""
        if not meta or f"{PREFIX}runtime" not in meta:
            return None
        try:
            length = meta.get(f"{PREFIX}max_seq_length")
            return cls(meta[f"{PREFIX}runtime"],
                       {lib: meta[f"{PREFIX}{lib}"] for lib in ("torch", "transformers", "peft") if f"{PREFIX}{lib}" in meta},
                       json.loads(meta.get(f"{PREFIX}patch_set", "{}")), int(length) if length else None,
                       meta.get(f"{PREFIX}base_fingerprint", ""), json.loads(meta.get(f"{PREFIX}base_config", "{}")))
        except (ValueError, TypeError):
            return None
