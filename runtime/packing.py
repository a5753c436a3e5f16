"""Packed batches: several documents in one row, as TRL and transformers collators produce them.

A batch is packed when it carries `cu_seq_lens_q` (TRL's `padding_free=True`, `DataCollatorWithFlattening(
return_flash_attn_kwargs=True)`) or when its `position_ids` restart inside a row (`DataCollatorWithFlattening`'s
default), with no padding mask: a mask with zeros makes it a padded batch, whose mask the library builds right.
`Documents` is the layout found, read once per forward (one host sync) and handed to every attention layer as
the standard flash-attention keywords, so layers never read it again.

`problems(model, batch)` says which attention modules would still attend across documents, by the rules the
installed transformers applies (measured on 5.24: SDPA and eager build a per-document mask from restarting
`position_ids` only when the batch has no attention mask and the forward makes no cache; flash-attention honours
`cu_seq_lens` or, with one row, restarting `position_ids`, unless an attention mask is given).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

IGNORE = -100
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")
_WARNED = "_adapter_doctor_packing_warned"
_STATE = "_adapter_doctor_packing_state"


class PackingWarning(UserWarning):
    """A packed batch reaches attention that will not keep its documents apart."""


@dataclass(frozen=True)
class Documents:
    cu_seq_lens: Any  # int32 [documents + 1], over the batch flattened row after row (a row start is a boundary)
    max_length: int
    position_ids: Any  # [rows, seq], restarting at each document


def _tokens(batch: dict[str, Any]) -> Any:
    """The batch's input (its ids, or else its embeddings) with rows and positions, or None."""
    for key in ("input_ids", "inputs_embeds"):
        value = batch.get(key)
        if value is not None and getattr(value, "dim", lambda: 0)() >= 2:
            return value
    return None


def _shape(batch: dict[str, Any]) -> tuple[int, int] | None:
    tokens = _tokens(batch)
    return None if tokens is None else (int(tokens.shape[0]), int(tokens.shape[1]))


def _all_ones(mask: Any) -> bool:
    return mask.dim() == 2 and bool(mask.bool().all())


def has_cache(batch: dict[str, Any]) -> bool:
    return any(batch.get(key) is not None for key in _CACHE_KEYS)


def find_documents(batch: dict[str, Any]) -> Documents | None:
    """The packed layout of `batch` (a forward's keyword arguments), or None for a batch of one document a row,
    a padded batch, or a forward that continues a cache."""
    import torch

    shape = _shape(batch)
    mask = batch.get("attention_mask")
    position_ids, cu = batch.get("position_ids"), batch.get("cu_seq_lens_q")
    if shape is None or (position_ids is None and cu is None) or has_cache(batch):
        return None  # the common batch: decided without reading a tensor
    if mask is not None and not _all_ones(mask):
        return None
    rows, length = shape
    if cu is not None:
        device = position_ids.device if position_ids is not None else cu.device
        starts = torch.zeros(rows * length, dtype=torch.bool, device=device)
        starts[cu[:-1].to(device=device, dtype=torch.long)] = True
    else:
        ids = position_ids.expand(rows, -1)
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] - ids[:, :-1] != 1
        starts = starts.reshape(-1)
    starts.view(rows, length)[:, 0] = True  # a row never continues the one before it
    begins = starts.nonzero().flatten()
    if begins.numel() <= rows:  # one document a row: nothing to keep apart
        return None
    total = torch.tensor([rows * length], device=begins.device)
    cu_seq_lens = torch.cat([begins, total]).to(torch.int32)
    lengths = cu_seq_lens.diff()
    if position_ids is None:
        index = torch.arange(rows * length, device=begins.device)
        position_ids = (index - torch.repeat_interleave(begins, lengths)).view(rows, length)
    return Documents(cu_seq_lens, int(lengths.max()), position_ids.expand(rows, -1))


_PROBED: list[bool] = []


def _library_masks_single_documents() -> bool:
    """Whether the library builds a full causal mask for rows of one document each when a batch has no attention
    mask and no cache (transformers 4.57: its check for packed sequences never answers "none"), where for a mask
    of ones it builds none and SDPA runs causal by itself. Asked of the library's own check, not its version,
    once, outside tracing (where 5.x's check answers with a tensor too) and outside any mode that makes fake or
    wrapped tensors (its answer there is not the library's: not kept, and no mask handed)."""
    if not _PROBED:
        import torch

        positions = torch.arange(4, device="cpu")[None]
        if type(positions) is not torch.Tensor:  # under FakeTensorMode and the like
            return False
        try:
            from transformers import masking_utils

            _PROBED.append(masking_utils.find_packed_sequence_indices(positions) is not None)
        except Exception:  # noqa: BLE001 - no such check, or one that cannot run: the library is left as it is
            _PROBED.append(False)
    return _PROBED[0]


def causal_mask_of_ones(model: Any, batch: dict[str, Any]) -> Any:
    """For a batch that `find_documents` found not packed (one document a row), with no padding mask, no cache
    and no `cache_position`, on a library that would then hand SDPA a full causal mask
    (`_library_masks_single_documents`): an attention mask of ones, with which it hands the full-attention layers
    none, so SDPA runs causal by itself (its fastest kernels, and the layers can keep their attention for a
    checkpoint's replay); sliding-window layers past their window get their mask either way. None where the
    library needs no help, while compiling or tracing (the library then builds a mask whatever it is given),
    while a CUDA graph captures the forward (the library reads a mask's values on the host: `mask.all()`, which
    a capture forbids; it builds its own mask without reading any), or where the attention is not SDPA
    (flash-attention would unpad for a mask; eager builds one either way)."""
    import torch

    tokens = _tokens(batch)
    if tokens is None or batch.get("attention_mask") is not None or batch.get("cache_position") is not None \
            or has_cache(batch) or getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa" \
            or torch.compiler.is_compiling() or torch.jit.is_tracing() or not _library_masks_single_documents() \
            or (tokens.is_cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return None
    return torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)


def with_documents(batch: dict[str, Any], documents: Documents) -> dict[str, Any]:
    """`batch` with the layout as flash-attention keywords and per-document positions, and with no target
    across a boundary: the label of each document's first token is ignored, as the collators do."""
    out = dict(batch)
    cu = documents.cu_seq_lens
    out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=documents.max_length,
               max_length_k=documents.max_length, position_ids=documents.position_ids)
    if out.get("labels") is not None:
        labels = out["labels"].clone()
        labels.view(-1)[cu[:-1].long()] = IGNORE
        out["labels"] = labels
    if out.get("shift_labels") is not None:  # already shifted: the target at a document's last token
        shifted = out["shift_labels"].clone()
        length = shifted.shape[-1]
        ends = cu[1:].long() - 1
        shifted.view(-1)[ends[(ends + 1) % length != 0]] = IGNORE  # a row's last target is already ignored
        out["shift_labels"] = shifted
    return out


@dataclass(frozen=True)
class Problem:
    path: str  # the module's path in the model
    cls: str  # its class
    why: str
    fix: str


FIX_RUNTIME = "call adapter_doctor.ensure_patched(model), whose attention keeps documents apart"


def _resolved_use_cache(model: Any, batch: dict[str, Any], layers: Any = None, config: Any = None) -> bool:
    """Whether the forward will build a cache, as transformers' `merge_with_config_defaults` decides. `layers`
    (the modules that carry a `gradient_checkpointing` flag) and `config`, when known; else the model is walked."""
    import torch

    use_cache = batch.get("use_cache")
    if use_cache is None:
        config = _config(model) if config is None else config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config  # the decoder's
        use_cache = getattr(text, "use_cache", None)
    if not use_cache:
        return False
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in (model.modules() if layers is None
                                                                               else layers))
    return not (checkpointing and model.training and torch.is_grad_enabled())


def _config(model: Any) -> Any:
    return next((m.config for m in model.modules() if getattr(m, "config", None) is not None), None)


def _attention_modules(model: Any) -> list[tuple[str, Any]]:
    """Causal self-attention modules: those the spec table names, and any other transformers `*Attention`
    with projections that says it is causal (a vision tower's, an encoder's or a cross-attention says not,
    and packing does not concern them)."""
    from .specs import ARCHITECTURES, ATTENTION, match

    rows = tuple(spec for specs in ARCHITECTURES.values() for spec in specs if spec.implementation == ATTENTION)
    out = []
    for path, module in model.named_modules():
        cls = type(module)
        if match(rows, module) is not None:
            out.append((path, module))
            continue
        library = (cls.__module__ or "").startswith("transformers.") and cls.__name__.endswith("Attention")
        projects = any(hasattr(module, name) for name in ("q_proj", "qkv_proj", "query_key_value"))
        if library and projects and getattr(module, "is_causal", False) is True:
            out.append((path, module))
    return out


def _ours(module: Any) -> bool:
    return getattr(type(module), "_adapter_doctor_patch", None) is not None


def _library_verdict(module: Any, batch: dict[str, Any], cache: bool, rows: int) -> str | None:
    """Why the library's own attention would mix documents, or None when it keeps them apart."""
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager"
    masked = batch.get("attention_mask") is not None
    if "flash" in implementation:
        if masked:
            return f"{implementation} unpads by the attention mask, which joins the documents of a row"
        if all(batch.get(k) is not None for k in VARLEN_KEYS) or (rows == 1 and batch.get("position_ids") is not None):
            return None
        return f"{implementation} finds documents from position_ids only in a batch of one row"
    if implementation in ("eager", "sdpa", "flex_attention"):
        if masked:
            return f"{implementation}: with an attention mask, transformers ignores restarting position_ids"
        if cache or has_cache(batch):
            return (f"{implementation}: the forward builds a cache (use_cache), and transformers then makes a plain "
                    "causal mask across the whole row")
        if batch.get("position_ids") is None:
            return f"{implementation}: no position_ids, so transformers cannot see where documents start"
        return None
    return f"attention implementation {implementation!r}: unknown whether it honours document boundaries"


def problems(model: Any, batch: dict[str, Any], documents: Documents | None = None) -> list[Problem]:
    """The attention modules of `model` that would attend across the documents of `batch`, and what
    else about the batch would cross a boundary; [] for a batch that is not packed."""
    documents = documents or find_documents(batch)
    if documents is None:
        return []
    shape = _shape(batch) or (1, 0)
    cache = _resolved_use_cache(model, batch)
    lm_ours = any(_ours(m) and type(m).__name__.endswith("ForCausalLM") for m in model.modules())
    out = []
    for path, module in _attention_modules(model):
        if _ours(module) and (lm_ours or batch.get("cu_seq_lens_q") is not None):
            continue
        why = _library_verdict(module, batch, cache, shape[0])
        if why is not None:
            fix = FIX_RUNTIME if not _ours(module) else "patch the causal LM too: ensure_patched(model)"
            if "use_cache" in why:
                fix += ", or pass use_cache=False"
            out.append(Problem(path, type(module).__name__, why, fix))
    labels = batch.get("labels")
    if labels is not None and not lm_ours:
        starts = documents.cu_seq_lens[:-1].long()
        inner = starts[starts % shape[1] != 0]  # a row's first label is never a target
        crossing = int((labels.reshape(-1)[inner] != IGNORE).sum())
        if crossing > 0:
            out.append(Problem("", "labels", f"{crossing} document(s) start with a label that is not {IGNORE}: "
                               "the last token of the document before is trained to predict it",
                               f"set the label of each document's first token to {IGNORE} (DataCollatorWithFlattening "
                               "and TRL's padding_free collator do)"))
    return out


def describe(found: list[Problem]) -> str:
    first = found[0]
    where = f"{first.cls} at {first.path or '(root)'}"
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"packed batch: {where}{more} will attend across documents: {first.why}. Fix: {first.fix}."


def warn_once(model: Any, found: list[Problem], stacklevel: int = 3) -> None:
    """One PackingWarning per model and reason (a flag on the model records that it was given)."""
    seen = model.__dict__.setdefault(_WARNED, set())
    new = [p for p in found if (p.cls, p.why) not in seen]
    if not new:
        return
    seen.update((p.cls, p.why) for p in new)
    warnings.warn(describe(new), PackingWarning, stacklevel=stacklevel)


@dataclass
class _State:
    """What check_once keeps on a model: the kinds of packed batch already checked, and what it reads every
    forward without walking the modules again."""
    layers: tuple[Any, ...]  # the modules with a `gradient_checkpointing` flag
    config: Any
    checked: set[tuple[Any, ...]] = field(default_factory=set)


def _state(model: Any) -> _State:
    state = model.__dict__.get(_STATE)
    if state is None:
        layers = tuple(m for m in model.modules() if hasattr(m, "gradient_checkpointing"))
        state = model.__dict__[_STATE] = _State(layers, _config(model))
    return state


def forget(model: Any) -> None:
    """Drop what check_once learnt about `model` and its submodules: their classes changed (patch, unpatch)."""
    for module in model.modules():
        module.__dict__.pop(_STATE, None)


def check_once(model: Any, batch: dict[str, Any], documents: Documents | None = None) -> None:
    """`problems` and their warning, computed once per model and kind of packed batch: the answer depends on
    the batch's keys, whether the forward makes a cache and the attention implementation, not on the tokens,
    and walking the modules every step costs. `documents`: the batch's layout, found here when not given."""
    state = _state(model)
    config = getattr(model, "config", None)
    config = state.config if config is None else config
    shape = _shape(batch)
    kind = (_resolved_use_cache(model, batch, state.layers, config), str(getattr(config, "_attn_implementation", None)),
            has_cache(batch), batch.get("attention_mask") is not None, batch.get("position_ids") is not None,
            batch.get("cu_seq_lens_q") is not None, shape is not None and shape[0] == 1,
            batch.get("labels") is not None)
    if kind in state.checked:
        return
    documents = documents or find_documents(batch)
    if documents is None:  # not packed: says nothing of this kind's packed batches
        return
    state.checked.add(kind)
    found = problems(model, batch, documents)
    if found:
        warn_once(model, found, stacklevel=5)


def attach_guard(model: Any) -> Any:
    """Warn (once per reason) when a packed batch reaches `model` while some attention would mix its documents;
    for models trained without our runtime. Checked once per kind of packed batch (`check_once`); patching or
    unpatching the model makes it check again. Returns the hook handle: `.remove()` detaches it."""

    def guard(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        batch = dict(kwargs)
        if args and "input_ids" not in batch:
            batch["input_ids"] = args[0]
        check_once(module, batch)

    return model.register_forward_pre_hook(guard, with_kwargs=True)
