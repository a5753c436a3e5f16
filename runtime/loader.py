"""load: one call that gives a correct, patched, trainable model, however the adapter was trained."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _base_of(adapter: Path, base: str | os.PathLike[str] | None) -> str:
    if base is not None:
        return str(base)
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    name = config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{adapter / 'adapter_config.json'} names no base model; pass base=")
    # A relative path in the config was relative to where training ran; try here, then beside the adapter.
    for candidate in (Path(name), adapter / name):
        if candidate.is_dir():
            return str(candidate)
    return name


def _tokenizer(*places: str) -> Any:
    from transformers import AutoTokenizer

    for place in places:
        try:
            return AutoTokenizer.from_pretrained(place)
        except Exception:  # noqa: BLE001 - no tokenizer, or one this transformers cannot convert: try the next
            continue
    return None  # tiny test models and some bases ship no tokenizer


def _placement(device: Any, dtype: Any) -> tuple[Any, Any]:
    """The accelerator when there is one, and bf16 there (fp32 on the CPU), unless the caller chose."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type != "cpu" else torch.float32
    return device, dtype


def load(path: str | os.PathLike[str], *, max_seq_length: int | None = None, dtype: Any = None, trainable: bool = True,
         base: str | os.PathLike[str] | None = None, kernels: str = "auto", device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a model folder or an adapter folder, patched and ready to train.

    An adapter folder is attached to its base (`base_model_name_or_path`, or `base=`) with
    `is_trainable=trainable`, the step plain `PeftModel.from_pretrained` leaves frozen by default.
    The model goes to `device` (default: the GPU when there is one) in `dtype` (default: bf16 on a GPU, fp32
    on the CPU). Modules another runtime patched in this process get the library's behaviour back.
    The tokenizer is None when neither folder has one.
    """
    from transformers import AutoModelForCausalLM

    from .engine import patch

    path = Path(path)
    device, dtype = _placement(device, dtype)
    kwargs = {"dtype": dtype}
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base_name = _base_of(path, base)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_name, **kwargs), str(path),
                                          is_trainable=trainable)
        tokenizer = _tokenizer(str(path), base_name)
    elif (path / "config.json").is_file():
        model, tokenizer = AutoModelForCausalLM.from_pretrained(str(path), **kwargs), _tokenizer(str(path))
    else:
        raise FileNotFoundError(f"{path}: neither adapter_config.json nor config.json is here")
    model.to(device)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length  # recorded by save_adapter's provenance
    if trainable:
        model.train()
    patch(model, kernels=kernels)
    return model, tokenizer
