"""shape-mismatch: tensor shapes that disagree with the config's ranks or with the base model's dimensions."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterator

from packaging.version import Version

from ..adapter_keys import AdapterKey, ParameterSelector, pattern_matches, pattern_value
from ..artifact import Tensor
from ..base_model import BaseModel, Module, arch_facts, expert_regex
from ..expert_lora import SWAP_FIXED, expert_pairs
from ..finding import Finding, Severity
from ..knowledge import behaviour, has_behaviour, parse_version
from ..user_regex import Matcher
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
MOE_SWAP = Check(
    "ADC606", CAT, Severity.ERROR, "MoE target_parameters saved with in and out swapped",
    "PEFT 0.17 and 0.18 read a 3-D expert parameter as (experts, in, out); transformers 5 stores (experts, out, in), "
    "and PEFT 0.19 reads it so. A target_parameters adapter saved by 0.18 therefore has lora_A over the out side and "
    "lora_B over the in side: newer PEFT raises `size mismatch`, or, where both sides are equal (hidden = 2 x "
    "intermediate for gate_up_proj), loads it silently wrong. The fix moves each factor to the other side, exactly.",
    fixer="moe-swap")
PATTERN_REMAP = Check(
    "ADC605", CAT, Severity.ERROR, "rank_pattern/alpha_pattern entries the transformers 5 MoE conversion loses",
    "Loading a transformers 4 per-expert MoE adapter under transformers 5, PEFT 0.19+ moves the expert targets "
    "(w1/w3/w2, gate_proj/up_proj/down_proj) to the fused `gate_up_proj`/`down_proj` parameters and sets "
    "rank_pattern/alpha_pattern for `gate_up_proj` to 2 x r and 2 x lora_alpha of the global values (peft #3009). "
    "A pattern written for the per-expert modules matches nothing afterwards: a per-expert rank then raises "
    "`size mismatch`, a per-expert alpha is silently replaced.",
    manual="Load it under transformers 4.57 with PEFT <= 0.18, or retrain under transformers 5.")
register(RANK, BASE_DIMS, VOCAB, INNER, MOE_SWAP, PATTERN_REMAP)


MERGED_GROUPS = 2  # peft 0.1/0.2 tuners/lora.py: MergedLinear's lora_B is nn.Conv1d(..., kernel_size=1, groups=2)


def merged_lora_parts(config: dict) -> int:
    """How many parts of a fused projection PEFT 0.2's `enable_lora` adapts (0: not that layout)."""
    enable = config.get("enable_lora")
    return sum(1 for x in enable if x is True) if isinstance(enable, list) else 0


def expected_rank(module: str, config: dict, matcher: Matcher | None = None) -> int | None:
    """The rank PEFT gives `module`: the first matching rank_pattern key, else r. None when unknown: a key
    that cannot be run within `matcher`'s budget leaves which key comes first open."""
    rank = pattern_value(config.get("rank_pattern"), module, config.get("r"), matcher)
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


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
    yield from _moe_swap(ctx, config, where)
    yield from _patterns_lost(ctx, config, by_module, where)
    # MergedLinear's B covers only the enabled parts of the output; ADC203 names that layout
    if ctx.base is not None and ctx.base.modules and not merged_lora_parts(config):
        yield from _base_dims(by_module, ctx.base, where)


def _ranks(config: dict, by_module: dict, where: str, matcher: Matcher) -> Iterator[Finding]:
    wrong, inner = [], []
    experts_of = ParameterSelector(config.get("target_parameters"))
    merged = merged_lora_parts(config)
    for module, roles in sorted(by_module.items()):
        a, b = roles.get("lora_A") or roles.get("lora_embedding_A"), roles.get("lora_B") or roles.get("lora_embedding_B")
        if a is None or b is None or len(a[1].shape) < 2 or len(b[1].shape) < 2:
            continue
        rank_a, rank_b = a[1].shape[0], b[1].shape[1]
        if merged and len(b[1].shape) == 3:
            # PEFT 0.2's MergedLinear: A is [r * n_enabled, in], B a Conv1d with groups=2, [out_enabled, r * n_enabled / 2, 1]
            r = config.get("r")
            if rank_a != rank_b * MERGED_GROUPS:
                inner.append((module, rank_a, rank_b))
            elif isinstance(r, int) and rank_a != r * merged:
                wrong.append((module, rank_a, r * merged))
            continue
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


def _moe_swap(ctx: Context, config: dict, where: str) -> Iterator[Finding]:
    fact = behaviour("moe_param_out_in_order")
    stamp = config.get("peft_version")
    saved = parse_version(stamp) if isinstance(stamp, str) and config.get("target_parameters") else None
    if saved is None or saved.local == SWAP_FIXED or not has_behaviour("moe_param_out_in_order", ctx.target_release):
        return
    if not Version(fact["target_parameters_since"]) <= Version(saved.base_version) <= Version(fact["since"]):
        return
    if Version(saved.base_version) == Version(fact["since"]) and not saved.is_devrelease:
        return
    if ctx.base is not None and ctx.base.model_type in fact["transposed_model_types"]:
        return  # these experts are stored (experts, in, out), which every release reads alike
    tensors = ctx.artifact.tensors or {}
    pairs = expert_pairs(config, list(tensors), {n: tuple(t.shape) for n, t in tensors.items()}, ctx.matcher)
    if not pairs:
        return
    dev = saved.is_devrelease
    yield MOE_SWAP.finding(
        f"saved by PEFT {stamp}{' (a development build, which may predate the change)' if dev else ''}: {len(pairs)} "
        f"LoRA pair(s) on 3-D expert parameters, e.g. {pairs[0][0]}, have lora_A and lora_B on the sides PEFT "
        f"{ctx.target_release.version} swaps; it raises `size mismatch` or, for square experts, loads them wrong",
        f"{where}#{pairs[0][0]}", severity=Severity.WARNING if dev else None)


def _expert_modules(modules: list[str]) -> list[str]:
    """Per-expert MoE projections (transformers 4 layout) among `modules`, for every known MoE family."""
    out = []
    for layout in arch_facts()["moe"]["layouts"].values():
        per_expert = re.compile(expert_regex(layout["per_expert"]))
        leaves = {*layout.get("gate_up", ()), layout.get("down")}
        out += [m for m in modules if per_expert.search(m + ".") and m.rsplit(".", 1)[-1] in leaves]
    return sorted(set(out))


def _patterns_lost(ctx: Context, config: dict, by_module: dict, where: str) -> Iterator[Finding]:
    patterns = {f: config.get(f) for f in ("rank_pattern", "alpha_pattern") if isinstance(config.get(f), dict) and config.get(f)}
    tf = parse_version(ctx.env.transformers) if ctx.env.transformers else None
    if not patterns or (tf is not None and tf.major < 5) or not has_behaviour("moe_per_expert_conversion", ctx.target_release):
        return
    if ctx.base is not None and ctx.base.model_type not in behaviour("moe_per_expert_conversion")["model_types"]:
        return  # PEFT converts only these families
    experts = _expert_modules([m for m, roles in by_module.items() if "lora_A" in roles])
    for field_name, pattern in patterns.items():
        lost = []
        for key in (k for k in pattern if isinstance(k, str)):
            hit = next((m for m in experts if pattern_matches(key, {m}, ctx.matcher)), None)
            if hit is not None:
                lost.append((key, hit))
        if lost:
            (key, module), more = lost[0], f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
            yield PATTERN_REMAP.finding(
                f"{field_name} {key!r}{more} sets the per-expert module {module}; transformers "
                f"{ctx.env.transformers or '5'} with PEFT {ctx.target_release.version} retargets the experts to fused "
                f"parameters, where {field_name} becomes 2 x the global value and this entry matches nothing",
                ctx.config_file(field_name), severity=Severity.ERROR if field_name == "rank_pattern" else Severity.WARNING)
