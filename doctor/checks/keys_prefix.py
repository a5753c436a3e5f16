"""keys-prefix: tensor names that PEFT will not match (wrapper prefixes, adapter names, missing base prefix)."""
from __future__ import annotations

from typing import Iterator

from ..adapter_keys import AdapterKey
from ..finding import Finding, Severity, sample
from ..knowledge import has_behaviour
from . import Check, Context, register, runner

CAT = "keys-prefix"
PROMPT_TYPES = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT"}
WRAPPER = Check(
    "ADC501", CAT, Severity.ERROR, "Tensor names carry a training-wrapper prefix",
    "torch.compile (`_orig_mod.`), DDP (`module.`) and FSDP (`_fsdp_wrapped_module.`) wrap the model, and saving the "
    "wrapper's state dict keeps their prefixes. PEFT matches none of those keys: the adapter loads as a no-op "
    "(PEFT 0.14+ warns about missing keys; older releases say nothing), and on VLMs PEFT raises a key_mapping "
    "ValueError.", fixer="canonicalize-keys")
ADAPTER_NAME = Check(
    "ADC502", CAT, Severity.ERROR, "Tensor names still contain the adapter name",
    "PEFT removes the adapter name (`.default`) when saving and inserts it again when loading. A key saved with the "
    "name gets it twice (`lora_A.default.default.weight`), matches nothing, and the adapter loads as a no-op.",
    fixer="canonicalize-keys")
NO_PREFIX = Check(
    "ADC503", CAT, Severity.ERROR, "Tensor names lack the base_model.model. prefix",
    "PEFT's saved keys start with `base_model.model.`. Keys without it (a raw `model.state_dict()` save) match "
    "nothing, so the adapter loads as a no-op.", fixer="canonicalize-keys")
register(WRAPPER, ADAPTER_NAME, NO_PREFIX)


def _sample(keys: list[AdapterKey]) -> str:
    return keys[0].name + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


@runner
def check(ctx: Context) -> Iterator[Finding]:
    primary = ctx.artifact.primary_weights
    tensors = ctx.artifact.tensors
    if not tensors or primary is None or ctx.not_peft:
        return
    keys = list(ctx.artifact.keys.values())
    where = str(primary.path)
    for wrapper in ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        hit = [k for k in keys if wrapper in k.wrappers]
        if hit:
            yield WRAPPER.finding(f"{len(hit)} of {len(keys)} tensor names contain {wrapper!r}, e.g. {_sample(hit)}",
                                  f"{where}#{hit[0].name}", title=f"Tensor names carry the {wrapper.rstrip('.')} prefix")
    named = [k for k in keys if k.adapter_name]
    if named:
        names = sorted({k.adapter_name for k in named})
        message = f"{len(named)} tensor names contain the adapter name {sample([repr(n) for n in names])}, e.g. {_sample(named)}"
        release = ctx.target_release
        if has_behaviour("adapter_name_in_keys", release):
            yield ADAPTER_NAME.finding(f"{message}. PEFT {release.version} loads them only when the adapter is loaded "
                                       f"under that name; older releases load nothing.", f"{where}#{named[0].name}",
                                       severity=Severity.WARNING)
        else:
            yield ADAPTER_NAME.finding(f"{message}. PEFT {release.version} matches none of them.", f"{where}#{named[0].name}")
    if ctx.peft_type in PROMPT_TYPES:
        return
    bare = [k for k in keys if not k.has_base_prefix and k.role != "prompt"]
    if bare:
        yield NO_PREFIX.finding(f"{len(bare)} of {len(keys)} tensor names do not start with base_model.model., "
                                f"e.g. {_sample(bare)}", f"{where}#{bare[0].name}")
