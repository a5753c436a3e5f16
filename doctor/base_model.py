"""A description of the base model an adapter will be attached to, built without torch.

The module tree comes from the base's safetensors headers when it has weights, otherwise from its
config.json through the templates in `knowledge/architectures.json`. Either way it is mapped to
the layout the *target* transformers version builds at runtime (VLM `language_model` paths since
4.52, fused MoE experts since 5.0, the per-architecture renames of `knowledge/transformers_renames.json`),
because that is what PEFT matches adapter keys against. Where the target transformers is unknown (not
installed, no flag), the newest known layout is built, so a verdict does not depend on whether
transformers happens to be installed.
"""
from __future__ import annotations

import ast
import json
import operator
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from packaging.version import Version

from . import pickle_scan, safetensors_header, transformers_renames
from .knowledge import parse_version

_KNOWLEDGE = Path(__file__).parent / "knowledge" / "architectures.json"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_MAX_SHARDS = 4096  # a 405B model has 191
_MAX_CONFIG_MODULES = 1 << 20  # layers x experts x projections that a config may imply


@lru_cache(maxsize=1)
def arch_facts() -> dict:
    with open(_KNOWLEDGE, encoding="utf-8") as fh:
        return json.load(fh)


def expert_regex(per_expert: str, index: str = r"\d+") -> str:
    """A regex for an MoE layout's per-expert module path (`block_sparse_moe.experts.{e}.`), `index` for `{e}`."""
    return re.escape(per_expert).replace(r"\{e\}", index)


def expert_dims(config: dict) -> tuple[int, int, int] | None:
    """(experts, hidden, moe_intermediate) of an MoE base's config (or its text_config), None when one is missing."""
    base = BaseModel(Path("."), config, {}, "config")
    experts, hidden, inter = (base.dim(k) for k in ("experts", "hidden", "moe_intermediate"))
    return (experts, hidden, inter) if experts and hidden and inter else None


def family_of(model_type: str | None) -> str | None:
    for family, types in arch_facts()["decoder_families"].items():
        if model_type in types:
            return family
    return None


@dataclass(frozen=True)
class Module:
    kind: str  # linear, conv1d, embedding, experts
    in_features: int | None
    out_features: int | None
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)  # for experts: fused 3-D parameters


@dataclass
class BaseModel:
    path: Path
    config: dict
    modules: dict[str, Module]
    source: str  # "weights" or "config"
    layout: str | None = None  # the transformers release whose layout `modules` is in

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> list[str]:
        archs = self.config.get("architectures") or []
        return [a for a in archs if isinstance(a, str)]

    @property
    def text_config(self) -> dict:
        text = self.config.get("text_config")
        return text if isinstance(text, dict) else self.config

    def dim(self, name: str) -> int | None:
        for key in arch_facts()["config_dims"][name]:
            value = self.text_config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        if name == "head_dim":
            hidden, heads = self.dim("hidden"), self.dim("heads")
            return hidden // heads if hidden and heads else None
        if name == "intermediate" and family_of(self.text_config.get("model_type", self.model_type)) == "gpt2":
            hidden = self.dim("hidden")
            return 4 * hidden if hidden else None
        return None

    @property
    def quantized(self) -> bool:
        return "quantization_config" in self.config


class BaseError(Exception):
    """A base folder that cannot be described (no or unreadable config.json)."""


def _read_json(path: Path) -> object:
    """A JSON file of the base, read with the adapter config's bounds. Raises OSError or BaseError."""
    from .artifact import MAX_CONFIG_SIZE, parse_config_bytes

    with open(path, "rb") as fh:
        raw = fh.read(MAX_CONFIG_SIZE + 1)
    obj, problem = parse_config_bytes(raw)
    if problem is not None:
        raise BaseError(f"{path}: {problem.message}")
    return obj


def load_base(path: Path, transformers_version: str | None) -> BaseModel:
    config_path = path / "config.json"
    try:
        config = _read_json(config_path)
    except FileNotFoundError:
        raise BaseError(f"{path}: no config.json") from None
    except (OSError, ValueError) as exc:
        raise BaseError(f"{config_path}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise BaseError(f"{config_path}: not a JSON object")
    params = _weight_shapes(path)
    tf = layout_release(transformers_version)
    if params:
        modules = _modules_from_params(_to_runtime_names(params, config, tf), config)
        return BaseModel(path, config, modules, "weights", str(tf))
    return BaseModel(path, config, _modules_from_config(config, tf), "config", str(tf))


def layout_release(transformers_version: str | None) -> Version:
    """The transformers release whose module layout is built: the target, else the newest known."""
    parsed = parse_version(transformers_version) if transformers_version else None
    return parsed or Version(transformers_renames.newest_release())


def layout_is_special(config: dict) -> bool:
    """VLM and MoE layouts are mapped by their own facts (architectures.json), not by the rename table."""
    family = family_of(config.get("model_type")) or family_of(_text_type(config))
    return _is_vlm(config) or family in arch_facts()["moe"]["layouts"]


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    files = [path / n for n in _WEIGHT_FILES if is_file(path / n)]
    for index in _INDEX_FILES:
        try:
            listing = _read_json(path / index)
        except (OSError, ValueError, BaseError):
            continue
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        if isinstance(weight_map, dict):
            files += sorted({path / f for f in weight_map.values() if isinstance(f, str)})
    if len(files) > _MAX_SHARDS:
        raise BaseError(f"{path}: its index names {len(files):,} weight files")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(_file_shapes(f))
        if len(shapes) > safetensors_header.MAX_TENSORS:
            raise BaseError(f"{path}: more than {safetensors_header.MAX_TENSORS:,} weights")
    return shapes


def is_file(path: Path) -> bool:
    """Path.is_file, but False for a path the OS cannot even look up (a 256-character name, a NUL)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _file_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    if f.suffix == ".safetensors":
        try:
            return {n: t.shape for n, t in safetensors_header.read_header(f).tensors.items()}
        except (safetensors_header.HeaderError, OSError, ValueError):
            return {}
    scan = pickle_scan.scan(f)
    return {n: t.shape for n, t in (scan.tensors or {}).items()} if scan.passed else {}


def _is_vlm(config: dict) -> bool:
    return config.get("model_type") in arch_facts()["vlm"]["model_types"] or "text_config" in config and "vision_config" in config


def _to_runtime_names(params: dict[str, tuple[int, ...]], config: dict, tf: Version | None) -> dict[str, tuple[int, ...]]:
    out = dict(params)
    if _is_vlm(config) and tf is not None:
        new_layout = tf >= Version(arch_facts()["vlm"]["new_layout_since"])
        for old, new in arch_facts()["vlm"]["renames"]:
            src, dst = (old, new) if new_layout else (new, old)
            out = {(dst + k[len(src):] if k.startswith(src) and not k.startswith(dst) else k): v for k, v in out.items()}
    family = family_of(config.get("model_type")) or family_of(_text_type(config))
    layout = arch_facts()["moe"]["layouts"].get(family or "")
    if layout and tf is not None and tf >= Version(arch_facts()["moe"]["fused_since"]):
        out = _fuse_experts(out, layout)
    if tf is not None and not layout_is_special(config):
        scopes = transformers_renames.transforms_for(config, tf)
        if transformers_renames.renames_modules(scopes) and transformers_renames.followed(scopes):
            out = {transformers_renames.rename_key(k, scopes).new: v for k, v in out.items()}
    return out


def _text_type(config: dict) -> str | None:
    text = config.get("text_config")
    return text.get("model_type") if isinstance(text, dict) else None


def _fuse_experts(params: dict[str, tuple[int, ...]], layout: dict) -> dict[str, tuple[int, ...]]:
    """Per-expert checkpoint weights as transformers 5 builds them: two 3-D parameters per layer."""
    per = expert_regex(layout["per_expert"], r"(\d+)")
    pattern = re.compile(rf"^(.*?){per}({'|'.join(map(re.escape, [*layout['gate_up'], layout['down']]))})\.weight$")
    out: dict[str, tuple[int, ...]] = {}
    experts: dict[tuple[str, str], list[tuple[int, ...]]] = {}
    for name, shape in params.items():
        m = pattern.match(name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), []).append(shape)
            continue
        for old, new in layout["renames"]:
            name = name.replace(old, new)
        out[name] = shape
    for (prefix, proj), shapes in experts.items():
        fused = prefix + layout["fused"]
        if proj == layout["down"]:
            out[f"{fused}down_proj"] = (len(shapes), *shapes[0])
        elif proj == layout["gate_up"][0]:
            out[f"{fused}gate_up_proj"] = (len(shapes), 2 * shapes[0][0], shapes[0][1])
    return out


def _modules_from_params(params: dict[str, tuple[int, ...]], config: dict) -> dict[str, Module]:
    conv1d = set(arch_facts()["conv1d_modules"].get(config.get("model_type", ""), []))
    modules: dict[str, Module] = {}
    for name, shape in params.items():
        owner, _, leaf = name.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj") and len(shape) == 3:
            prev = modules.get(owner)
            merged = {**(prev.params if prev else {}), leaf: shape}
            modules[owner] = Module("experts", None, None, merged)
        elif leaf == "weight" and len(shape) == 2:
            modules[owner] = _module_for(owner, shape, conv1d)
    if config.get("tie_word_embeddings", True) and "lm_head" not in modules:
        embed = next((m for n, m in modules.items() if m.kind == "embedding" and n.endswith(("embed_tokens", "wte"))), None)
        if embed is not None and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or []):
            modules["lm_head"] = Module("linear", embed.out_features, embed.in_features)
    return modules


def _module_for(path: str, shape: tuple[int, ...], conv1d: set[str]) -> Module:
    leaf = path.rsplit(".", 1)[-1]
    if "embed" in leaf or leaf in ("wte", "wpe", "word_embeddings", "shared"):
        return Module("embedding", shape[0], shape[1])  # rows, dim: in=num_embeddings, out=embedding_dim
    if leaf in conv1d:
        return Module("conv1d", shape[0], shape[1])
    return Module("linear", shape[1], shape[0])


def _modules_from_config(config: dict, tf: Version | None) -> dict[str, Module]:
    text_config = config.get("text_config")
    text: dict = text_config if isinstance(text_config, dict) else config
    family = family_of(text.get("model_type", config.get("model_type")))
    template = arch_facts()["templates"].get("gpt2" if family == "gpt2" else "llama") if family else None
    if template is None:
        return {}
    base = BaseModel(Path("."), config, {}, "config")
    dims = {name: base.dim(name) for name in arch_facts()["config_dims"]}
    layers = dims.get("layers") or 0
    if layers * len(template) * max(1, dims.get("experts") or 1) > _MAX_CONFIG_MODULES:
        return {}  # no real model is that deep: describing it would take hours
    params: dict[str, tuple[int, ...]] = {}
    for path, (kind, fan_in, fan_out) in template.items():
        if family in ("moe_mlp_experts", "mixtral") and ".mlp." in path:
            continue
        i_dim, o_dim = _eval(fan_in, dims), _eval(fan_out, dims)
        if i_dim is None or o_dim is None:
            continue
        shape = {"embedding": (i_dim, o_dim), "conv1d": (i_dim, o_dim)}.get(kind, (o_dim, i_dim))
        for i in range(layers) if "{i}" in path else [None]:
            params[path.format(i=i) + ".weight"] = shape
    if family in ("moe_mlp_experts", "mixtral"):
        params.update(_expert_params(family, config, layers))
    if _is_vlm(config):  # the pre-4.52 on-disk layout; _to_runtime_names moves it where tf builds it
        params = {"language_model." + k: v for k, v in params.items()}
    return _modules_from_params(_to_runtime_names(params, config, tf), {**text, "tie_word_embeddings": False})


def _expert_params(family: str, config: dict, layers: int) -> dict[str, tuple[int, ...]]:
    layout = arch_facts()["moe"]["layouts"][family]
    sizes = expert_dims(config)
    if sizes is None:
        return {}
    experts, hidden, inter = sizes
    out: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        for e in range(experts):
            prefix = f"model.layers.{i}." + layout["per_expert"].format(e=e)
            for proj in layout["gate_up"]:
                out[prefix + proj + ".weight"] = (inter, hidden)
            out[prefix + layout["down"] + ".weight"] = (hidden, inter)
        out[f"model.layers.{i}.{layout['router'][0]}.weight"] = (experts, hidden)  # the router: nn.Linear(hidden, E)
    return out


_OPS = {ast.Mult: operator.mul, ast.Add: operator.add, ast.FloorDiv: operator.floordiv, ast.Sub: operator.sub}


def _eval(expr: str, dims: dict) -> int | None:
    """Evaluate a dimension formula such as `kv_heads*head_dim` over config dimensions."""

    def walk(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return dims.get(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            return None if left is None or right is None else _OPS[type(node.op)](left, right)
        return None

    return walk(ast.parse(expr, mode="eval").body)


def hf_cache_dir() -> Path:
    """The hub cache as huggingface_hub finds it: HF_HUB_CACHE, the older HUGGINGFACE_HUB_CACHE, then
    HF_HOME/hub, HF_HOME defaulting to $XDG_CACHE_HOME/huggingface (~/.cache/huggingface)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expanduser(os.environ[name]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def find_in_hf_cache(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a Hub model, if it has been downloaded."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / (revision or "main")
    try:
        commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    except OSError:
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if is_file(snapshot / "config.json") else None


_WINDOWS = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")
_PLACEHOLDER = re.compile(r"[<>{}]|path/to|your[-_/]|/path/", re.I)


@dataclass
class BaseResolution:
    """Where the base model was looked for, and what was found."""

    name: str | None  # base_model_name_or_path as written
    base: BaseModel | None = None
    source: str | None = None  # "flag", "path" or "cache"
    kind: str = "none"  # none, windows, placeholder, absolute-missing, relative-missing, hub-missing, found, unreadable
    detail: str = ""


def resolve_base(name: object, revision: object, flag: Path | None, adapter_root: Path,
                 transformers_version: str | None) -> BaseResolution:
    """Find the base: `--base`, else `base_model_name_or_path` on disk, else in the local HF cache."""
    res = BaseResolution(name if isinstance(name, str) else None)
    if flag is not None:
        return _load_into(res, flag, "flag", transformers_version)
    text = res.name.strip() if res.name else ""
    if not text:
        return res
    if _WINDOWS.match(text):
        res.kind = "windows"
        return res
    if _PLACEHOLDER.search(text):
        res.kind = "placeholder"
        return res
    path = Path(text)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, adapter_root / path]
    for candidate in candidates:
        if is_file(candidate / "config.json"):
            return _load_into(res, candidate, "path", transformers_version)
    if path.is_absolute():
        res.kind = "absolute-missing"
        return res
    cached = find_in_hf_cache(text, revision if isinstance(revision, str) else None) if text.count("/") <= 1 else None
    if cached is not None:
        return _load_into(res, cached, "cache", transformers_version)
    res.kind = "relative-missing" if text.startswith((".", "/")) or text.count("/") > 1 else "hub-missing"
    return res


def _load_into(res: BaseResolution, path: Path, source: str, transformers_version: str | None) -> BaseResolution:
    res.source = source
    try:
        res.base = load_base(path, transformers_version)
        res.kind = "found"
    except BaseError as exc:
        res.kind, res.detail = "unreadable", str(exc)
    return res
