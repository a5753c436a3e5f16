"""Move MoE LoRA adapters between transformers 4's per-expert layout and transformers 5's fused one.

transformers 4 builds each expert projection as an nn.Linear (`block_sparse_moe.experts.3.w1`): a LoRA
has A [r, in] and B [out, r] per expert. transformers 5 fuses the experts into 3-D parameters,
`mlp.experts.gate_up_proj` [E, 2*I, H] (gate rows, then up rows) and `down_proj` [E, H, I], which PEFT
adapts with `target_parameters`: one ParamWrapper per parameter, lora_A [E*R, in] with expert e in rows
e*R .. e*R+R-1, lora_B [out, R*E] with expert e in columns e, E+e, 2E+e, ... (B is read as [out, R, E]).
Two wrappers on one module nest in parameter order, so gate_up_proj's keys then carry `.base_layer`.
The router becomes the 2-D parameter `mlp.gate.weight`, with the same LoRA shapes as before.

Both directions only move stored bits and fill zeros. alpha/r (alpha/sqrt(r) with rsLoRA) stays in the
config, never folded into the weights; what cannot be carried exactly raises `LayoutRefusal`.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
from adapter_doctor.adapter_keys import BASE_PREFIX, entry_names, pattern_matches, pattern_value
from adapter_doctor.float_bits import FLOATS
from adapter_doctor.user_regex import Matcher

from .expert_layout import ExpertLayout, LayoutRefusal, expert_layout
from .tensors import RawTensor

__all__ = ["LayoutRefusal", "expert_layout", "fused_to_per_expert", "per_expert_to_fused"]

_BITS = {dtype: spec[1] for dtype, spec in FLOATS.items()}  # values travel as bits, never through arithmetic
_FACTOR_LEAVES = {"lora_A.weight": "a", "lora_B.weight": "b"}


class Factors(NamedTuple):
    """One LoRA's factors as unsigned-integer views of the stored bits."""

    a: np.ndarray  # [rank, in]
    b: np.ndarray  # [out, rank]


class Lora(NamedTuple):
    factors: Factors
    rank: int
    scaling: float  # alpha/r, or alpha/sqrt(r) with rsLoRA


@dataclass(frozen=True)
class Placed:
    """A module the conversion writes, and the rank and alpha PEFT must give it."""

    layer: str  # "model.layers.3."
    pattern: str  # a rank_pattern key naming the module within its layer
    rank: int
    alpha: int | float


@dataclass
class _Conversion:
    """One conversion under way: the tensors it took and wrote, and what the new config must say."""

    layout: ExpertLayout
    config: dict
    matcher: Matcher = field(default_factory=lambda: Matcher(math.inf))  # patterns were bounded by expert_layout
    dtype: str | None = None
    router_moved: bool = False
    out: dict[str, RawTensor] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)  # PEFT's names of the modules or parameters that go away
    kept: set[str] = field(default_factory=set)  # and of the LoRA modules that stay as they are
    placed: dict[str, Placed] = field(default_factory=dict)  # by the new module's name

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    def take(self, tensors: dict[str, RawTensor], middle: str) -> dict[tuple, dict[str, np.ndarray]]:
        """LoRA factors of `<layer>.<middle>.lora_*`, by (layer, *groups of middle): {"a": bits, "b": bits}."""
        found: dict[tuple, dict[str, np.ndarray]] = {}
        pattern = re.compile(rf"^(.*?){middle}\.(lora_.*)$")
        for name, tensor in tensors.items():
            m = pattern.match(name)
            if m is None:
                continue
            *groups, leaf = m.groups()
            if leaf not in _FACTOR_LEAVES:
                raise LayoutRefusal(f"{name}: only lora_A and lora_B weights can change layout")
            found.setdefault(tuple(groups), {})[_FACTOR_LEAVES[leaf]] = self.bits(tensor, name)
            self.taken.add(name)
        return found

    def bits(self, tensor: RawTensor, name: str) -> np.ndarray:
        if tensor.dtype not in _BITS or self.dtype not in (None, tensor.dtype) or len(tensor.shape) != 2:
            raise LayoutRefusal(f"{name}: expert LoRA weights must be 2-D and share one float dtype "
                                f"(found {tensor.dtype})")
        self.dtype = tensor.dtype
        return np.frombuffer(tensor.data, dtype=_BITS[tensor.dtype]).reshape(tensor.shape)

    def module(self, layer: str, tail: str) -> str:
        return layer.removeprefix(BASE_PREFIX) + tail

    def lora(self, found: dict[str, np.ndarray], module: str, experts: int = 1) -> Lora:
        """`module`'s factors, with the rank per expert and the scaling PEFT gives it, checked against the config."""
        if set(found) != {"a", "b"} or found["a"].shape[0] != found["b"].shape[1]:
            raise LayoutRefusal(f"{module}: lora_A and lora_B do not pair up")
        rank = self.value("rank_pattern", "r", module)
        if rank * experts != found["a"].shape[0]:
            held = found["a"].shape[0] / experts
            raise LayoutRefusal(f"{module}: the weights hold rank {held:g}, the config says {rank}")
        return Lora(Factors(found["a"], found["b"]), rank, self.scaling(self.value("alpha_pattern", "lora_alpha", module), rank))

    def value(self, patterns: str, default: str, module: str):
        """The rank or alpha PEFT gives `module`."""
        found = pattern_value(self.config.get(patterns), module, self.config.get(default, 8), self.matcher)
        if found is None:
            raise LayoutRefusal(f"{module}: which {patterns} key names it cannot be decided in bounded time")
        return found

    def scaling(self, alpha: float, rank: int) -> float:
        return alpha / (math.sqrt(rank) if self.rslora else rank)  # as PEFT's update_layer computes it

    def default_scaling(self) -> float:
        return self.scaling(self.config.get("lora_alpha", 8), self.config.get("r", 8))

    def move_router(self, layer: str, found: dict[str, np.ndarray], before: str, after: str) -> None:
        """The router's LoRA is an nn.Linear one in transformers 4 and a 2-D ParamWrapper in 5: same factors."""
        self.router_moved = True
        self.gone.add(self.module(layer, before))
        lora = self.lora(found, self.module(layer, before))
        self.put(layer, after.removesuffix(".weight") + ".", lora, after, re.escape(after))

    def put(self, layer: str, at: str, lora: Lora, name: str, pattern: str) -> None:
        """Write `lora` as `<layer><at>lora_{A,B}.weight`, for the module PEFT calls `name` (matched by `pattern`)."""
        factor = math.sqrt(lora.rank) if self.rslora else lora.rank
        exact = lora.scaling * factor  # the alpha that keeps the scaling, if one does
        alpha = next((x for x in (round(exact), exact, math.nextafter(exact, 0), math.nextafter(exact, math.inf))
                      if self.scaling(x, lora.rank) == lora.scaling), None)
        if alpha is None:
            raise LayoutRefusal(f"{self.module(layer, name)}: no lora_alpha gives rank {lora.rank} "
                                f"the scaling {lora.scaling!r}")
        for leaf, bits in zip(_FACTOR_LEAVES, lora.factors):
            self.add(f"{layer}{at}{leaf}", RawTensor(self.dtype, bits.shape, np.ascontiguousarray(bits).tobytes()))
        self.placed[self.module(layer, name)] = Placed(layer.removeprefix(BASE_PREFIX), pattern, lora.rank, alpha)

    def add(self, name: str, tensor: RawTensor) -> None:
        if name in self.out:
            raise LayoutRefusal(f"{name}: the adapter already holds tensors in both layouts")
        self.out[name] = tensor

    def keep_rest(self, tensors: dict[str, RawTensor]) -> None:
        for name, tensor in tensors.items():
            if name not in self.taken:
                self.add(name, tensor)
                if ".lora_" in name:
                    self.kept.add(name.removeprefix(BASE_PREFIX).split(".lora_")[0])

    def finish(self, new: dict) -> tuple[dict[str, RawTensor], dict]:
        new["rank_pattern"] = self.patterns("rank_pattern", "r", lambda p: p.rank)
        new["alpha_pattern"] = self.patterns("alpha_pattern", "lora_alpha", lambda p: p.alpha)
        return {n: self.out[n] for n in sorted(self.out, key=_natural)}, new

    def patterns(self, name: str, default_key: str, wanted: Callable[[Placed], object]) -> dict:
        """Patterns for the new modules first, so that they win, then every old one still naming a kept module."""
        default = self.config.get(default_key, 8)
        remaining = {p: v for p, v in (self.config.get(name) or {}).items()
                     if not pattern_matches(p, self.gone, self.matcher) or pattern_matches(p, self.kept, self.matcher)}
        groups: dict[str, dict[str, Placed]] = {}
        for module, placed in self.placed.items():
            groups.setdefault(placed.pattern, {})[module] = placed
        added = {}
        for pattern, members in groups.items():
            wrong = {m: p for m, p in members.items()
                     if pattern_value(remaining, m, default, self.matcher) != wanted(p)}
            if not wrong:
                continue
            if len({wanted(p) for p in members.values()}) == 1:
                added[pattern] = wanted(next(iter(members.values())))
            else:  # layers differ: a pattern for each layer that needs one (a layer's experts share rank and alpha)
                added.update({re.escape(p.layer) + pattern: wanted(p) for p in wrong.values()})
        return {**added, **remaining}


def per_expert_to_fused(tensors: dict[str, RawTensor], config: dict,
                        base_config: dict) -> tuple[dict[str, RawTensor], dict]:
    """The adapter in transformers 5's fused layout."""
    layout = expert_layout(config, base_config)
    job = _Conversion(layout, config)
    router = layout.router_fused + ".weight"
    for (layer,), found in job.take(tensors, re.escape(layout.router_per_expert)).items():
        job.move_router(layer, found, layout.router_per_expert, router)
    by_layer: dict[str, dict[tuple[str, int], dict[str, np.ndarray]]] = {}
    projections = "|".join(map(re.escape, [layout.gate, layout.up, layout.down]))
    for (layer, expert, projection), found in job.take(tensors, layout.expert_regex(r"(\d+)") + rf"({projections})").items():
        by_layer.setdefault(layer, {})[projection, int(expert)] = found
    present = {projection for group in by_layer.values() for projection, _ in group}
    roles = [role for role in layout.fused_params if present & set(layout.projections(role))]
    inner = next(iter(layout.fused_params))  # of two wrappers on one module, the first parameter's is the inner one
    for layer, group in by_layer.items():
        for role in roles:
            at = layout.fused + ("base_layer." if len(roles) == 2 and role == inner else "")
            name = layout.fused_name(role)
            job.put(layer, at, _fuse(job, layer, group, role), name, re.escape(name))
    job.keep_rest(tensors)
    new = copy.deepcopy(config)
    added = [layout.fused_name(role) for role in roles]
    if job.router_moved:
        added.append(router)
    new["target_parameters"] = list(dict.fromkeys([*(config.get("target_parameters") or []), *added])) or None
    new["target_modules"] = _drop_targets(config.get("target_modules"), job.gone, job.kept)
    if roles and config.get("lora_dropout"):
        new["lora_dropout"] = 0.0  # ParamWrapper refuses dropout; it is the identity at inference anyway
    return job.finish(new)


def fused_to_per_expert(tensors: dict[str, RawTensor], config: dict,
                        base_config: dict) -> tuple[dict[str, RawTensor], dict]:
    """The adapter in transformers 4's per-expert layout."""
    layout = expert_layout(config, base_config)
    job = _Conversion(layout, config)
    for (layer,), found in job.take(tensors, re.escape(layout.router_fused)).items():
        job.move_router(layer, found, layout.router_fused + ".weight", layout.router_per_expert)
    by_layer: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for (layer, nesting), found in job.take(tensors, re.escape(layout.fused.rstrip(".")) + r"(|\.base_layer)").items():
        by_layer.setdefault(layer, {})[nesting] = found
    emitted: list[str] = []
    targets = config.get("target_parameters") or []
    for layer, wrappers in by_layer.items():
        roles = [role for role in layout.fused_params
                 if any(entry_names(t, job.module(layer, layout.fused_name(role))) for t in targets)]
        allowed = {1: {""}, 2: {"", ".base_layer"}}.get(len(roles), set())
        if set(wrappers) - allowed:
            raise LayoutRefusal(f"{layer}: its fused expert tensors do not match target_parameters")
        for nesting, found in wrappers.items():
            role = roles[0] if nesting or len(roles) == 1 else roles[1]  # the inner wrapper carries .base_layer
            for projection, per_expert in _split(job, layer, role, found):
                if projection not in emitted:
                    emitted.append(projection)
                pattern = layout.expert_regex(r"\d+") + re.escape(projection)
                for expert, lora in enumerate(per_expert):
                    name = layout.per_expert.format(e=expert) + projection
                    job.put(layer, name + ".", lora, name, pattern)
    job.keep_rest(tensors)
    new = copy.deepcopy(config)
    new["target_parameters"] = [t for t in targets if not any(entry_names(t, m) for m in job.gone)] or None
    order = [layout.gate, layout.up, layout.down]
    projections = sorted(emitted, key=order.index)
    if layout.names_unique:
        names = list(projections)
    else:
        names = [layout.per_expert.format(e=e) + p for e in range(layout.experts) for p in projections]
    regex = [layout.expert_regex(r"\d+") + re.escape(p) for p in projections]
    if job.router_moved:
        names.append(layout.router_per_expert)
        regex.append(re.escape(layout.router_per_expert))
    new["target_modules"] = _add_targets(config.get("target_modules"), names, rf".*\.(?:{'|'.join(regex)})")
    return job.finish(new)


def _fuse(job: _Conversion, layer: str, group: dict[tuple[str, int], dict[str, np.ndarray]], role: str) -> Lora:
    """One layer's per-expert LoRAs for `role` as one LoRA on the fused parameter, missing blocks zero."""
    layout = job.layout
    projections = layout.projections(role)
    if any(expert >= layout.experts for _, expert in group):
        raise LayoutRefusal(f"{layer}: expert LoRAs past the base's {layout.experts} experts")
    per: dict[str, list[Lora | None]] = {p: [None] * layout.experts for p in projections}
    for (projection, expert), found in group.items():
        if projection not in per:
            continue
        module = job.module(layer, layout.per_expert.format(e=expert) + projection)
        job.gone.add(module)
        lora = job.lora(found, module)
        if (lora.factors.a.shape[1], lora.factors.b.shape[0]) != layout.dims(projection):
            raise LayoutRefusal(f"{module}: LoRA shapes {lora.factors.a.shape}, {lora.factors.b.shape} "
                                "do not fit the base's experts")
        per[projection][expert] = lora
    scalings = {lora.scaling for loras in per.values() for lora in loras if lora}
    if len(scalings) > 1:
        raise LayoutRefusal(f"{layer}: the experts' {'/'.join(projections)} LoRAs have different alpha/r scalings "
                            f"{sorted(scalings)}, and one fused parameter has one scaling")
    scaling = scalings.pop() if scalings else job.default_scaling()
    ranks = {p: max((lora.rank for lora in loras if lora), default=0) for p, loras in per.items()}
    fallback_rank = job.config.get("r", 8)

    def padded(lora: Lora | None, rank: int) -> Factors:
        return _pad(lora.factors if lora else None, rank, layout.dims(projections[0]), job.dtype)

    if role != "gate_up":
        rank = ranks[layout.down] or fallback_rank
        return Lora(_pack([padded(lora, rank) for lora in per[layout.down]]), rank, scaling)
    pairs = list(zip(per[layout.gate], per[layout.up]))
    if all(g is None or u is None or np.array_equal(g.factors.a, u.factors.a) for g, u in pairs):
        rank = max(ranks.values()) or fallback_rank  # one A serves both: stack the Bs, no extra rank
        blocks = [Factors(padded(g or u, rank).a, np.vstack([padded(g, rank).b, padded(u, rank).b]))
                  for g, u in pairs]
        return Lora(_pack(blocks), rank, scaling)
    blocks = []  # two As: block-diagonal B over the concatenated As, as PEFT's own on-load conversion builds it
    for g, u in pairs:
        gate, up = padded(g, ranks[layout.gate]), padded(u, ranks[layout.up])
        b = np.block([[gate.b, np.zeros_like(up.b)], [np.zeros_like(gate.b), up.b]])
        blocks.append(Factors(np.vstack([gate.a, up.a]), b))
    return Lora(_pack(blocks), ranks[layout.gate] + ranks[layout.up], scaling)


def _split(job: _Conversion, layer: str, role: str, found: dict[str, np.ndarray]) -> list[tuple[str, list[Lora]]]:
    """A fused LoRA as per-expert LoRAs: [(projection, one LoRA per expert)]."""
    layout = job.layout
    name = job.module(layer, layout.fused_name(role))
    job.gone.add(name)
    fused = job.lora(found, name, layout.experts)
    a, b, rank = fused.factors.a, fused.factors.b, fused.rank
    if (a.shape[1], b.shape[0]) != layout.dims(role):
        raise LayoutRefusal(f"{name}: LoRA shapes {a.shape}, {b.shape} do not fit the base's experts")
    per = [Factors(*f) for f in zip(a.reshape(layout.experts, rank, -1),
                                    np.moveaxis(b.reshape(b.shape[0], rank, layout.experts), 2, 0))]

    def each(projection: str, take: Callable[[Factors], Factors], rank_each: int) -> tuple[str, list[Lora]]:
        return projection, [Lora(take(f), rank_each, fused.scaling) for f in per]

    if role != "gate_up":
        return [each(layout.down, lambda f: f, rank)]
    inter, half = layout.intermediate, rank // 2
    gate_rows, up_rows = slice(0, inter), slice(inter, None)
    off_diagonal = any(_nonzero(f.b[:inter, half:]) or _nonzero(f.b[inter:, :half]) for f in per)
    if rank % 2 == 0 and not off_diagonal:  # block-diagonal: each half keeps its As
        return [each(layout.gate, lambda f: Factors(f.a[:half], f.b[:inter, :half]), half),
                each(layout.up, lambda f: Factors(f.a[half:], f.b[inter:, half:]), half)]
    gate_zero = not any(_nonzero(f.b[gate_rows]) for f in per)
    up_zero = not any(_nonzero(f.b[up_rows]) for f in per)
    if gate_zero != up_zero:  # one half never trained (or zero-filled on the way in): only the other is a LoRA
        keep, rows = (layout.gate, gate_rows) if up_zero else (layout.up, up_rows)
        return [each(keep, lambda f: Factors(f.a, f.b[rows]), rank)]
    # Any other B: gate and up each keep the whole A and their rows of B, which is exact for every B.
    return [each(layout.gate, lambda f: Factors(f.a, f.b[gate_rows]), rank),
            each(layout.up, lambda f: Factors(f.a, f.b[up_rows]), rank)]


def _pad(factors: Factors | None, rank: int, dims: tuple[int, int], dtype: str | None) -> Factors:
    """A [rank, in] and B [out, rank] holding `factors` in the leading rank slots and zeros after it."""
    a, b = np.zeros((rank, dims[0]), _BITS[dtype or "F32"]), np.zeros((dims[1], rank), _BITS[dtype or "F32"])
    if factors is not None:
        held = len(factors.a)
        a[:held], b[:, :held] = factors.a, factors.b
    return Factors(a, b)


def _pack(per_expert: list[Factors]) -> Factors:
    b = np.stack([f.b for f in per_expert], axis=-1)  # [out, R, E]: expert e's rank k is column k*E + e
    return Factors(np.concatenate([f.a for f in per_expert]), b.reshape(b.shape[0], -1))


def _nonzero(bits: np.ndarray) -> bool:
    return bool(np.any(bits & ~np.array(1 << (bits.dtype.itemsize * 8 - 1), bits.dtype)))  # -0.0 is zero too


def _natural(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]  # layers.2 before layers.10


def _drop_targets(targets, gone: set[str], kept: set[str]):
    """target_modules without the entries that only named modules which went away."""
    if not gone or targets is None:
        return targets
    if isinstance(targets, str):  # a regex would still name the experts, and PEFT remaps those: list the kept ones
        return sorted(kept)
    return [t for t in targets if not any(entry_names(t, m) for m in gone) or any(entry_names(t, m) for m in kept)]


def _add_targets(targets, names: list[str], regex: str):
    if not names:
        return targets
    if isinstance(targets, str):
        return f"(?:{targets})|(?:{regex})"
    return sorted({*(targets or []), *names})
