"""save_adapter: plain PEFT files, with provenance in the safetensors header."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from adapter_doctor.provenance import Provenance, base_fields, fingerprint, runtime_version

from .classes import marker_of
from .sharding import is_partial

_BASE_PREFIX = "base_model.model."


def adapted_modules(model: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of every module a LoRA layer wraps, by its path in the base model."""
    out = {}
    for path, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if hasattr(module, "lora_A") and hasattr(module, "in_features") and base is not None and hasattr(base, "weight"):
            out[path.removeprefix(_BASE_PREFIX)] = (int(module.in_features), int(module.out_features))
    return out


def provenance(model: Any, max_seq_length: int | None = None) -> Provenance:
    import peft
    import torch
    import transformers

    config = model.get_base_model().config.to_dict() if hasattr(model, "get_base_model") else model.config.to_dict()
    markers = [marker for m in model.modules() if (marker := marker_of(m)) is not None]
    patch_set = {"kernels": sorted({marker.kernels for marker in markers}),
                 "modules": dict(sorted(Counter(marker.original.__name__ for marker in markers).items()))}
    length = max_seq_length if max_seq_length is not None else getattr(model, "max_seq_length", None)
    return Provenance(
        runtime=runtime_version(),
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        patch_set=patch_set,
        max_seq_length=int(length) if length is not None else None,
        base_fingerprint=fingerprint(config, adapted_modules(model)),
        base_config=base_fields(config),
    )


def _unwrapped(model: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def _refuse_partial(model: Any, state_dict: dict[str, Any] | None) -> None:
    """Raise before anything is written when what would be saved is a shard or empty: an FSDP2 DTensor, or a
    ZeRO-3 placeholder (doctor check reports both in others' adapters, ADC701)."""
    if state_dict is None:
        names = [name for name, p in model.named_parameters() if is_partial(p)]
        where = "the model's parameters"
    else:
        names = [name for name, t in state_dict.items() if hasattr(t, "numel") and is_partial(t)]
        where = "state_dict"
    if names:
        raise ValueError(f"{len(names)} tensors of {where} are shards or empty (FSDP2, ZeRO-3), e.g. {names[0]}: "
                         "gather a full state dict on every rank (accelerate's get_state_dict(model), or torch's "
                         "get_model_state_dict with full_state_dict=True) and pass it as state_dict= on rank 0")


def save_adapter(model: Any, directory: str | os.PathLike[str], *, max_seq_length: int | None = None,
                 state_dict: dict[str, Any] | None = None) -> Path:
    """Save like `PeftModel.save_pretrained`, adding provenance to each weights file's `__metadata__`.

    Under DDP, call it on rank 0 with the model or its wrapper. Under FSDP2 the parameters are shards: gather a
    full `state_dict` on every rank and pass it here on rank 0, as for `save_pretrained`; without it, or with
    shards in it, this raises ValueError and writes nothing.
    """
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    model = _unwrapped(model)
    _refuse_partial(model, state_dict)
    model.save_pretrained(str(directory), **({} if state_dict is None else {"state_dict": state_dict}))
    meta = {"format": "pt", **provenance(model, max_seq_length).to_metadata()}
    for name in model.peft_config:  # PEFT saves a non-default adapter in <dir>/<name>/
        weights = (directory if name == "default" else directory / name) / "adapter_model.safetensors"
        tmp = weights.with_name(f".{weights.name}.tmp")
        save_file(load_file(str(weights)), str(tmp), metadata=meta)
        os.replace(tmp, weights)  # a crash leaves PEFT's own file, never half of ours
    return directory
