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

import numpy as np
from adapter_doctor.adapter_keys import BASE_PREFIX
from adapter_doctor.base_model import arch_facts, family_of
from adapter_doctor.user_regex import RANK_FORM, pathological

from .tensors import RawTensor

_BITS = {"F64": "<u8", "F32": "<u4", "F16": "<u2", "BF16": "<u2"}  # values travel as bits, never through arithmetic
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "lora_bias", "fan_in_fan_out": "fan_in_fan_out",
                "velora_config": "VeLoRA", "kasa_config": "KaSA"}  # PEFT's ParamWrapper rejects each of these
Factors = tuple[np.ndarray, np.ndarray]  # A [r, in], B [out, r], as unsigned-integer views of the stored bits


class LayoutRefusal(Exception):
    """The adapter cannot change layout without changing what it computes."""


def per_expert_to_fused(tensors: dict[str, RawTensor], config: dict,
                        base_config: dict) -> tuple[dict[str, RawTensor], dict]:
    """The adapter in transformers 5's fused layout."""
    job = _Job(config, base_config)
    lay, params = job.layout, job.layout["fused_params"]
    for (layer,), found in job.take(tensors, re.escape(lay["router"][0])).items():
        job.router(layer, found, lay["router"][0], lay["router"][1] + ".weight")
    by_layer: dict[str, dict] = {}
    projs = "|".join(map(re.escape, [*lay["gate_up"], lay["down"]]))
    for (layer, e, proj), found in job.take(tensors, _per_expert_re(lay, r"(\d+)") + rf"({projs})").items():
        by_layer.setdefault(layer, {})[proj, int(e)] = found
    roles = [r for r in params if any(p in _projs(lay, r) for group in by_layer.values() for p, _ in group)]
    for layer, group in by_layer.items():
        for role in roles:  # of two wrappers the first parameter's is the inner one
            at = lay["fused"] + ("base_layer." if len(roles) == 2 and role == next(iter(params)) else "")
            name = lay["fused"] + params[role]
            job.put(layer, at, *_fuse(job, layer, group, role), name, re.escape(name))
    job.keep_rest(tensors)
    new = copy.deepcopy(config)
    added = [lay["fused"] + params[r] for r in roles] + [lay["router"][1] + ".weight"] * job.had_router
    new["target_parameters"] = list(dict.fromkeys([*(config.get("target_parameters") or []), *added])) or None
    new["target_modules"] = _drop_targets(config.get("target_modules"), job.old, job.kept)
    if roles and config.get("lora_dropout"):
        new["lora_dropout"] = 0.0  # ParamWrapper refuses dropout; it is the identity at inference anyway
    return job.finish(new)


def fused_to_per_expert(tensors: dict[str, RawTensor], config: dict,
                        base_config: dict) -> tuple[dict[str, RawTensor], dict]:
    """The adapter in transformers 4's per-expert layout."""
    job = _Job(config, base_config)
    lay, params = job.layout, job.layout["fused_params"]
    for (layer,), found in job.take(tensors, re.escape(lay["router"][1])).items():
        job.router(layer, found, lay["router"][1] + ".weight", lay["router"][0])
    by_layer: dict[str, dict] = {}
    for (layer, nest), found in job.take(tensors, re.escape(lay["fused"].rstrip(".")) + r"(|\.base_layer)").items():
        by_layer.setdefault(layer, {})[nest] = found
    emitted: list[str] = []
    for layer, wrappers in by_layer.items():
        roles = [r for r in params if any(_names(t, job.module(layer, lay["fused"] + params[r]))
                                          for t in config.get("target_parameters") or [])]
        if set(wrappers) - {1: {""}, 2: {"", ".base_layer"}}.get(len(roles), set()):
            raise LayoutRefusal(f"{layer}: its fused expert tensors do not match target_parameters")
        for nest, found in wrappers.items():
            role = roles[0] if nest or len(roles) == 1 else roles[1]
            for proj, per, rank, scale in _split(job, layer, role, found):
                emitted += [proj] * (proj not in emitted)
                pattern = _per_expert_re(lay, r"\d+") + re.escape(proj)
                for e, factors in enumerate(per):
                    name = lay["per_expert"].format(e=e) + proj
                    job.put(layer, name + ".", factors, rank, scale, name, pattern)
    job.keep_rest(tensors)
    new = copy.deepcopy(config)
    new["target_parameters"] = [t for t in config.get("target_parameters") or []
                                if not any(_names(t, m) for m in job.old)] or None
    projs = sorted(emitted, key=[*lay["gate_up"], lay["down"]].index)
    names = projs if lay["expert_names_unique"] else [lay["per_expert"].format(e=e) + p
                                                      for e in range(job.experts) for p in projs]
    regex = [_per_expert_re(lay, r"\d+") + re.escape(p) for p in projs]
    if job.had_router:
        names, regex = names + [lay["router"][0]], regex + [re.escape(lay["router"][0])]
    new["target_modules"] = _add_targets(config.get("target_modules"), names, rf".*\.(?:{'|'.join(regex)})")
    return job.finish(new)


class _Job:
    """One conversion: the layout facts, what it took and wrote, and the rank and alpha each new module needs."""

    def __init__(self, config: dict, base_config: dict) -> None:
        if config.get("peft_type", "LORA") != "LORA":
            raise LayoutRefusal(f"only LoRA has a fused expert layout, not {config.get('peft_type')!r}")
        for key, what in _UNSUPPORTED.items():
            if config.get(key):
                raise LayoutRefusal(f"{what}: PEFT's LoRA on fused expert parameters (ParamWrapper) has no equivalent")
        for field in ("rank_pattern", "alpha_pattern"):  # their keys are run as regexes below: bound them first
            patterns = config.get(field) if isinstance(config.get(field), dict) else {}
            bad = next(((k, why) for k in patterns if (why := pathological(RANK_FORM.format(k), whole=False))), None)
            if bad is not None:
                raise LayoutRefusal(f"{field} key {bad[0][:60]!r}: {bad[1]}; it is not run")
        text = base_config.get("text_config") if isinstance(base_config.get("text_config"), dict) else base_config
        model_type = text.get("model_type", base_config.get("model_type"))
        self.layout = arch_facts()["moe"]["layouts"].get(family_of(model_type) or "")
        if self.layout is None or self.layout.get("gate_up_split") != "gate_then_up":
            raise LayoutRefusal(f"no per-expert/fused expert layout is known for model_type {model_type!r}")
        dims = {k: next((text[n] for n in arch_facts()["config_dims"][k] if isinstance(text.get(n), int)), None)
                for k in ("experts", "hidden", "moe_intermediate")}
        if None in dims.values():
            raise LayoutRefusal("the base config does not give the number of experts and their sizes")
        self.experts, h, i = dims["experts"], dims["hidden"], dims["moe_intermediate"]
        gate, up = self.layout["gate_up"]
        self.dims = {gate: (h, i), up: (h, i), self.layout["down"]: (i, h), "gate_up": (h, 2 * i), "down": (i, h)}
        self.config, self.rslora, self.dtype, self.had_router = config, bool(config.get("use_rslora")), None, False
        self.out: dict[str, RawTensor] = {}
        self.taken: set[str] = set()
        self.old: set[str] = set()  # PEFT's matching names of the modules or parameters that go away
        self.kept: set[str] = set()  # and of the LoRA modules that stay as they are
        self.wanted: dict[str, tuple[str, str, int, int | float]] = {}  # new name -> (layer, pattern, rank, alpha)

    def module(self, layer: str, tail: str) -> str:
        return layer.removeprefix(BASE_PREFIX) + tail

    def take(self, tensors: dict[str, RawTensor], middle: str) -> dict[tuple, dict[str, np.ndarray]]:
        """LoRA factors of `<layer>.<middle>.lora_*`, by (layer, *groups of middle): {"A": bits, "B": bits}."""
        found: dict[tuple, dict[str, np.ndarray]] = {}
        for name, t in tensors.items():
            m = re.match(rf"^(.*?){middle}\.(lora_.*)$", name)
            if m:
                if m.group(m.re.groups) not in ("lora_A.weight", "lora_B.weight"):
                    raise LayoutRefusal(f"{name}: only lora_A and lora_B weights can change layout")
                found.setdefault(m.groups()[:-1], {})[m.group(m.re.groups)[5]] = self.bits(t, name)
                self.taken.add(name)
        return found

    def bits(self, t: RawTensor, name: str) -> np.ndarray:
        if t.dtype not in _BITS or self.dtype not in (None, t.dtype) or len(t.shape) != 2:
            raise LayoutRefusal(f"{name}: expert LoRA weights must be 2-D and share one float dtype (found {t.dtype})")
        self.dtype = t.dtype
        return np.frombuffer(t.data, dtype=_BITS[t.dtype]).reshape(t.shape)

    def factors(self, found: dict, module: str, experts: int = 1) -> tuple[Factors, int, float]:
        """(A, B), the rank per expert and the scaling PEFT gives `module`, checked against the config."""
        if set(found) != {"A", "B"} or found["A"].shape[0] != found["B"].shape[1]:
            raise LayoutRefusal(f"{module}: lora_A and lora_B do not pair up")
        rank = _resolve(self.config.get("rank_pattern"), self.config.get("r", 8), module)
        if rank * experts != found["A"].shape[0]:
            held = found["A"].shape[0] / experts
            raise LayoutRefusal(f"{module}: the weights hold rank {held:g}, the config says {rank}")
        return (found["A"], found["B"]), rank, self.scaling(_resolve(self.config.get("alpha_pattern"),
                                                                     self.config.get("lora_alpha", 8), module), rank)

    def scaling(self, alpha: float, rank: int) -> float:
        return alpha / (math.sqrt(rank) if self.rslora else rank)  # as PEFT's update_layer computes it

    def router(self, layer: str, found: dict, old: str, new: str) -> None:
        """The router's LoRA is an nn.Linear one in transformers 4 and a 2-D ParamWrapper in 5: same factors."""
        self.had_router = True
        self.old.add(self.module(layer, old))
        lora = self.factors(found, self.module(layer, old))
        self.put(layer, new.removesuffix(".weight") + ".", *lora, new, re.escape(new))

    def put(self, layer: str, at: str, lora: Factors, rank: int, scale: float, name: str, pattern: str) -> None:
        v = scale * (math.sqrt(rank) if self.rslora else rank)  # the alpha that keeps the scaling, if one does
        alpha = next((x for x in (round(v), v, math.nextafter(v, 0), math.nextafter(v, math.inf))
                      if self.scaling(x, rank) == scale), None)
        if alpha is None:
            raise LayoutRefusal(f"{self.module(layer, name)}: no lora_alpha gives rank {rank} the scaling {scale!r}")
        for leaf, x in zip(("lora_A.weight", "lora_B.weight"), lora):
            self.add(f"{layer}{at}{leaf}", RawTensor(self.dtype, x.shape, np.ascontiguousarray(x).tobytes()))
        self.wanted[self.module(layer, name)] = (layer.removeprefix(BASE_PREFIX), pattern, rank, alpha)

    def add(self, name: str, t: RawTensor) -> None:
        if name in self.out:
            raise LayoutRefusal(f"{name}: the adapter already holds tensors in both layouts")
        self.out[name] = t

    def keep_rest(self, tensors: dict[str, RawTensor]) -> None:
        for name, t in tensors.items():
            if name not in self.taken:
                self.add(name, t)
                if ".lora_" in name:
                    self.kept.add(name.removeprefix(BASE_PREFIX).split(".lora_")[0])

    def finish(self, new: dict) -> tuple[dict[str, RawTensor], dict]:
        for field, slot, default in (("rank_pattern", 2, "r"), ("alpha_pattern", 3, "lora_alpha")):
            new[field] = _patterns(self.config.get(field) or {}, self.config.get(default, 8), slot, self)
        return {n: self.out[n] for n in sorted(self.out, key=_natural)}, new


def _fuse(job: _Job, layer: str, group: dict, role: str) -> tuple[Factors, int, float]:
    """One layer's per-expert LoRAs for `role` as one LoRA on the fused parameter, missing blocks zero."""
    projs = _projs(job.layout, role)
    if any(e >= job.experts for _, e in group):
        raise LayoutRefusal(f"{layer}: expert LoRAs past the base's {job.experts} experts")
    per = {p: [None] * job.experts for p in projs}
    for (proj, e), found in group.items():
        if proj in per:
            module = job.module(layer, job.layout["per_expert"].format(e=e) + proj)
            job.old.add(module)
            (a, b), rank, scale = job.factors(found, module)
            if (a.shape[1], b.shape[0]) != job.dims[proj]:
                raise LayoutRefusal(f"{module}: LoRA shapes {a.shape}, {b.shape} do not fit the base's experts")
            per[proj][e] = (a, b, scale)
    scales = {f[2] for fs in per.values() for f in fs if f}
    if len(scales) > 1:
        raise LayoutRefusal(f"{layer}: the experts' {'/'.join(projs)} LoRAs have different alpha/r scalings "
                            f"{sorted(scales)}, and one fused parameter has one scaling")
    scale = scales.pop() if scales else job.scaling(job.config.get("lora_alpha", 8), job.config.get("r", 8))
    ranks = {p: max((f[0].shape[0] for f in fs if f), default=0) for p, fs in per.items()}

    def pad(lora: tuple | None, rank: int) -> Factors:
        return _pad(lora, rank, job.dims[projs[0]], job.dtype)

    if role != "gate_up":
        rank = ranks[projs[0]] or job.config.get("r", 8)
        return _pack([pad(f, rank) for f in per[projs[0]]]), rank, scale
    gate, up = projs
    if all(g is None or u is None or np.array_equal(g[0], u[0]) for g, u in zip(per[gate], per[up])):
        rank = max(ranks.values()) or job.config.get("r", 8)  # one A serves both: stack the Bs, no extra rank
        blocks = [(pad(g or u, rank)[0], np.vstack([pad(g, rank)[1], pad(u, rank)[1]]))
                  for g, u in zip(per[gate], per[up])]
        return _pack(blocks), rank, scale
    blocks = []  # two As: block-diagonal B over the concatenated As, as PEFT's own on-load conversion builds it
    for g, u in zip(per[gate], per[up]):
        (ag, bg), (au, bu) = pad(g, ranks[gate]), pad(u, ranks[up])
        blocks.append((np.vstack([ag, au]), np.block([[bg, np.zeros_like(bu)], [np.zeros_like(bg), bu]])))
    return _pack(blocks), ranks[gate] + ranks[up], scale


def _split(job: _Job, layer: str, role: str, found: dict) -> list[tuple[str, list[Factors], int, float]]:
    """A fused LoRA as per-expert LoRAs: [(projection, factors per expert, rank, scaling)]."""
    name = job.module(layer, job.layout["fused"] + job.layout["fused_params"][role])
    job.old.add(name)
    (a, b), rank, scale = job.factors(found, name, job.experts)
    if (a.shape[1], b.shape[0]) != job.dims[role]:
        raise LayoutRefusal(f"{name}: LoRA shapes {a.shape}, {b.shape} do not fit the base's experts")
    per = list(zip(a.reshape(job.experts, rank, -1), np.moveaxis(b.reshape(b.shape[0], rank, job.experts), 2, 0)))
    if role != "gate_up":
        return [(job.layout["down"], per, rank, scale)]
    (gate, up), i, h = job.layout["gate_up"], job.dims["gate_up"][1] // 2, rank // 2
    zero = {p: not any(_nonzero(pb[rows]) for _, pb in per) for p, rows in ((gate, slice(0, i)), (up, slice(i, None)))}
    if rank % 2 == 0 and not any(_nonzero(pb[:i, h:]) or _nonzero(pb[i:, :h]) for _, pb in per):
        return [(gate, [(pa[:h], pb[:i, :h]) for pa, pb in per], h, scale),  # block-diagonal: each half keeps its As
                (up, [(pa[h:], pb[i:, h:]) for pa, pb in per], h, scale)]
    if zero[gate] != zero[up]:  # one half never trained (or zero-filled on the way in): only the other is a LoRA
        keep, rows = (gate, slice(0, i)) if zero[up] else (up, slice(i, None))
        return [(keep, [(pa, pb[rows]) for pa, pb in per], rank, scale)]
    # Any other B: gate and up each keep the whole A and their rows of B, which is exact for every B.
    return [(gate, [(pa, pb[:i]) for pa, pb in per], rank, scale), (up, [(pa, pb[i:]) for pa, pb in per], rank, scale)]


def _pad(lora: tuple | None, rank: int, dims: tuple[int, int], dtype: str) -> Factors:
    """A [rank, in] and B [out, rank] holding `lora` in the leading rank slots and zeros after it."""
    a, b = np.zeros((rank, dims[0]), _BITS[dtype]), np.zeros((dims[1], rank), _BITS[dtype])
    if lora is not None:
        a[: len(lora[0])], b[:, : len(lora[0])] = lora[0], lora[1]
    return a, b


def _pack(per: list[Factors]) -> Factors:
    b = np.stack([pb for _, pb in per], axis=-1)  # [out, R, E]: expert e's rank k is column k*E + e
    return np.concatenate([pa for pa, _ in per]), b.reshape(b.shape[0], -1)


def _nonzero(bits: np.ndarray) -> bool:
    return bool(np.any(bits & ~np.array(1 << (bits.dtype.itemsize * 8 - 1), bits.dtype)))  # -0.0 is zero too


def _projs(layout: dict, role: str) -> list[str]:
    return list(layout["gate_up"]) if role == "gate_up" else [layout["down"]]


def _per_expert_re(layout: dict, index: str) -> str:
    return re.escape(layout["per_expert"]).replace(r"\{e\}", index)


def _names(target: str, module: str) -> bool:
    return module == target or module.endswith("." + target)  # PEFT's rule for a list entry


def _resolve(patterns: dict | None, default, module: str):
    """The rank or alpha PEFT gives `module`: the first pattern that matches it wins (get_pattern_key)."""
    return next((v for p, v in (patterns or {}).items() if re.match(rf"(.*\.)?({p})$", module)), default)


def _hits(pattern: str, names: set[str]) -> bool:
    return any(re.match(rf"(.*\.)?({pattern})$", n) for n in names)


def _natural(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]  # layers.2 before layers.10


def _patterns(old: dict, default, slot: int, job: _Job) -> dict:
    """Patterns for the new modules first, so that they win, then every old one still naming a kept module."""
    remaining = {p: v for p, v in old.items() if not _hits(p, job.old) or _hits(p, job.kept)}
    groups: dict[str, dict[str, tuple]] = {}
    for name, wanted in job.wanted.items():
        groups.setdefault(wanted[1], {})[name] = (wanted[0], wanted[slot])
    added = {}
    for pattern, members in groups.items():
        if any(_resolve(remaining, default, n) != v for n, (_, v) in members.items()):
            if len({v for _, v in members.values()}) == 1:
                added[pattern] = next(iter(members.values()))[1]
            else:  # layers differ: a pattern for each layer that needs one (a layer's experts share rank and alpha)
                added.update({re.escape(layer) + pattern: v for n, (layer, v) in members.items()
                              if _resolve(remaining, default, n) != v})
    return {**added, **remaining}


def _drop_targets(targets, old: set[str], kept: set[str]):
    """target_modules without the entries that only named modules which went away."""
    if not old or targets is None:
        return targets
    if isinstance(targets, str):  # a regex would still name the experts, and PEFT remaps those: list the kept ones
        return sorted(kept)
    return [t for t in targets if not any(_names(t, m) for m in old) or any(_names(t, m) for m in kept)]


def _add_targets(targets, names: list[str], regex: str):
    if not names:
        return targets
    if isinstance(targets, str):
        return f"(?:{targets})|(?:{regex})"
    return sorted({*(targets or []), *names})
