"""shape-mismatch: tensor shapes that disagree with the config's ranks or with the base model's dimensions."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterator

from ..adapter_keys import AdapterKey, ParameterSelector
from ..artifact import Tensor
from ..base_model import BaseModel, Module
from ..finding import Finding, Severity
from ..user_regex import RANK_FORM, Matcher
from . import Check, Context, register, runner

CAT = "shape-mismatch"
RANK = Check(
    "ADC601", CAT, Severity.ERROR, "LoRA rank differs from the config",
    "PEFT builds each LoRA layer with the rank from `r` (or the matching `rank_pattern` entry) and then copies the "
    "saved tensors in: a different rank raises `size mismatch for ...lora_A...`.",
    manual="Set r / rank_pattern to the ranks the weights have.")
BASE_DIMS = Check(
    "ADC602", CAT, Severity.ERROR, "LoRA shapes do not fit the base model",
    "lora_A is [r, in_features] and lora_B is [out_features, r] of the module they adapt. Other sizes mean the adapter "
    "was trained on another model (a different size or family): PEFT raises `size mismatch`.",
    manual="Load the adapter onto the base it was trained on.")
VOCAB = Check(
    "ADC603", CAT, Severity.ERROR, "Embedding rows differ from the base vocabulary",
    "The adapter saved embeddings (or embedding LoRA) for a vocabulary of another size, which happens when tokens "
    "were added in training. PEFT raises `size mismatch for ...embed_tokens...`.",
    manual="Call `model.resize_token_embeddings(N)` on the base (with the training tokenizer) before loading.")
INNER = Check(
    "ADC604", CAT, Severity.ERROR, "lora_A and lora_B disagree on the rank",
    "lora_A's rows and lora_B's columns are the same rank r; if they differ the file is inconsistent.",
    manual="Re-save the adapter from the training run.")
register(RANK, BASE_DIMS, VOCAB, INNER)


def expected_rank(module: str, config: dict, matcher: Matcher | None = None) -> int | None:
    """The rank PEFT gives `module`: the first matching rank_pattern key, else r. None when unknown:
    a key that cannot be run within `matcher`'s budget leaves which key comes first open."""
    pattern = config.get("rank_pattern")
    matcher = matcher or Matcher()
    if isinstance(pattern, dict):
        for key, rank in pattern.items():
            if not isinstance(key, str):
                continue
            try:
                hit = matcher.match(RANK_FORM.format(key), module)
            except re.error:  # PEFT would raise; read the key as a plain name
                hit = module == key or module.endswith("." + key)
            if hit is None:
                return None
            if hit and isinstance(rank, int):
                return rank
    r = config.get("r")
    return r if isinstance(r, int) and not isinstance(r, bool) else None


@runner
def check(ctx: Context) -> Iterator[Finding]:
    tensors, config = ctx.artifact.tensors, ctx.artifact.config
    if not tensors or config is None or ctx.peft_type != "LORA":
        return
    where = str(ctx.artifact.primary_weights.path)
    by_module: dict[str, dict[str, tuple[AdapterKey, Tensor]]] = defaultdict(dict)
    keys = ctx.artifact.keys
    for name, tensor in tensors.items():
        key = keys[name]
        if key.param != "bias" and tensor.numel:
            by_module[key.module][key.role] = (key, tensor)
    yield from _ranks(config, by_module, where, ctx.matcher)
    if ctx.base is not None and ctx.base.modules:
        yield from _base_dims(by_module, ctx.base, where)


def _ranks(config: dict, by_module: dict, where: str, matcher: Matcher) -> Iterator[Finding]:
    wrong, inner = [], []
    experts_of = ParameterSelector(config.get("target_parameters"))
    for module, roles in sorted(by_module.items()):
        a, b = roles.get("lora_A") or roles.get("lora_embedding_A"), roles.get("lora_B") or roles.get("lora_embedding_B")
        if a is None or b is None or len(a[1].shape) < 2 or len(b[1].shape) < 2:
            continue
        rank_a, rank_b = a[1].shape[0], b[1].shape[1]
        if rank_a != rank_b:
            inner.append((module, rank_a, rank_b))
            continue
        want = expected_rank(module, config, matcher)
        # target_parameters stacks the experts' ranks: [E*r, in]
        experts = want and rank_a % want == 0 and experts_of(module)
        if want is not None and rank_a != want and not experts and not config.get("use_bdlora"):
            wrong.append((module, rank_a, want))
    if wrong:
        module, got, want = wrong[0]
        yield RANK.finding(f"{len(wrong)} module(s) have rank {got} in the file where the config gives {want}, "
                           f"e.g. {module}", f"{where}#{module}")
    if inner:
        module, ra, rb = inner[0]
        yield INNER.finding(f"{module}: lora_A has {ra} rows, lora_B has {rb} columns", f"{where}#{module}")


def _base_dims(by_module: dict, base: BaseModel, where: str) -> Iterator[Finding]:
    bad, vocab = [], []
    for module, roles in sorted(by_module.items()):
        target = base.modules.get(module)
        if target is None or target.kind == "experts":
            continue
        for role, (_key, tensor) in roles.items():
            problem = _dim_problem(role, tensor.shape, target)
            if problem:
                (vocab if target.kind == "embedding" or module.endswith("lm_head") else bad).append((module, role, problem))
    if bad:
        module, role, problem = bad[0]
        yield BASE_DIMS.finding(f"{len(bad)} tensor(s) do not fit the base at {base.path}, e.g. {module}.{role}: {problem}",
                                f"{where}#{module}")
    if vocab:
        module, role, problem = vocab[0]
        yield VOCAB.finding(f"{module}.{role}: {problem} (base vocab_size {base.dim('vocab')})", f"{where}#{module}")


def _dim_problem(role: str, shape: tuple[int, ...], target: Module) -> str | None:
    if len(shape) < 2:
        return None
    checks = {
        "lora_A": ("in_features", shape[1], target.in_features),
        "lora_B": ("out_features", shape[0], target.out_features),
        "lora_embedding_A": ("num_embeddings", shape[1], target.in_features),
        "lora_embedding_B": ("embedding_dim", shape[0], target.out_features),
    }
    if role == "full":
        want = (target.out_features, target.in_features) if target.kind == "linear" else (target.in_features, target.out_features)
        return None if tuple(shape) == want else f"shape {list(shape)}, base {list(want)}"
    if role not in checks:
        return None
    what, got, want = checks[role]
    return None if want is None or got == want else f"{what} {got}, base has {want}"
