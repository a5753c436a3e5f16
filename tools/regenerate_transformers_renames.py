"""Regenerate transformers_renames.json: how each transformers 5 release renames checkpoint weights on load.

    python tools/regenerate_transformers_renames.py [--out PATH] [--cache DIR] [--only VERSIONS] [--all]

transformers 5 loads old checkpoints through a per-architecture list of weight transforms
(``conversion_mapping.py``): ``WeightRenaming`` moves a key to a new name, ``WeightConverter`` merges or
splits tensors. The modules of the model in memory carry the new names, so a LoRA adapter whose
``target_modules`` or keys use the old ones matches nothing. Every fact is read from a release's source with
``ast``; transformers is never imported. By default the first release of every 5.x minor and the newest
release are read (``--all`` reads every final 5.x release).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urljoin

from packaging.version import InvalidVersion, Version

INDEX_URL = "https://pypi.org/pypi/transformers/json"
FIRST = Version("5.0.0")  # conversion_mapping.py appeared with transformers 5
DEFAULT_CACHE = Path.home() / ".cache" / "adapter-doctor" / "transformers-wheels"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "doctor" / "knowledge" / "transformers_renames.json"
MAPPING_FILE = "transformers/conversion_mapping.py"
BUILDER = "_build_checkpoint_conversion_mapping"
ALIASES = "_MODEL_TO_CONVERSION_PATTERN"

Rule = dict[str, Any]  # {"src": [regex, ...], "dst": str} or {"convert": [regex, ...]} or {"opaque": name}


# --- PyPI ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Wheel:
    version: str
    url: str
    filename: str
    sha256: str


def list_wheels(index: dict, every: bool = False) -> list[Wheel]:
    """The 5.x wheels to read, oldest first: each minor's first final release and the newest (or all)."""
    found: dict[Version, Wheel] = {}
    for version, files in index["releases"].items():
        try:
            parsed = Version(version)
        except InvalidVersion:
            continue
        wheels = [f for f in files if f["packagetype"] == "bdist_wheel" and not f.get("yanked")]
        if parsed < FIRST or parsed.is_prerelease or parsed.is_devrelease or not wheels:
            continue
        w = wheels[0]
        found[parsed] = Wheel(version, urljoin(INDEX_URL, w["url"]), w["filename"], w["digests"]["sha256"])
    ordered = sorted(found)
    if every:
        return [found[v] for v in ordered]
    firsts = {}
    for v in ordered:
        firsts.setdefault((v.major, v.minor), v)
    chosen = sorted({*firsts.values(), ordered[-1]}) if ordered else []
    return [found[v] for v in chosen]


def fetch(wheel: Wheel, cache: Path) -> Path:
    path = cache / wheel.filename
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == wheel.sha256:
        return path
    with urllib.request.urlopen(wheel.url, timeout=300) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != wheel.sha256:
        raise RuntimeError(f"checksum mismatch for {wheel.filename}")
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_wheel(path: Path) -> dict[str, str]:
    """conversion_mapping.py and every modeling file of a wheel, by path."""
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n).decode("utf-8") for n in zf.namelist()
                if n == MAPPING_FILE or re.fullmatch(r"transformers/models/[^/]+/modeling_[^/]+\.py", n)}


# --- the patterns, compiled as transformers 5 compiles them --------------------------------

def _target_form(pattern: str) -> tuple[str, str | None]:
    """A target pattern as transformers stores it: no anchor, no lookaround, a capturing group as \\1."""
    pattern = pattern.removeprefix("^")
    pattern = re.sub(r"\(\?.+?\)?\)", "", pattern)
    group = re.search(r"\(.+?\)", pattern)
    captured = None
    if group:
        captured = group.group(0)
        pattern = pattern.replace(captured, r"\1", 1)
    return pattern.replace(r"\.", "."), captured


def _source_forms(sources: list[str], targets: list[str], captured: str | None) -> list[str]:
    out = []
    for i, pattern in enumerate(sources):
        if r"\1" in pattern and captured is not None:
            pattern = pattern.replace(r"\1", captured, 1)
        if len(sources) == len(targets) and targets[i].startswith("^") and not pattern.startswith("^"):
            pattern = "^" + pattern
        pattern = pattern.replace("*.", r".*\.")
        if re.search(r"[a-zA-Z0-9]$", pattern):
            pattern += r"(?!\w)"  # a pattern ends on a name boundary
        out.append(pattern)
    return sorted(out, key=lambda p: -len(p))  # the branch order of transformers' alternation: longest first


def renaming(sources: list[str], targets: list[str]) -> Rule | None:
    """A WeightRenaming as one rule; None when a pattern does not compile, or a branch lacks a group the target
    names (transformers would take another branch's group or fail): nothing can be said of it."""
    if not sources or not targets:
        return None
    dst, captured = _target_form(targets[0])
    src = _source_forms(sources, targets, captured)
    wanted = max((int(n) for n in re.findall(r"\\(\d+)", dst)), default=0)
    try:
        if any(re.compile(pattern).groups < wanted for pattern in src):
            return None
    except re.error:
        return None
    return {"src": src, "dst": dst}


# --- a small interpreter for the builder function -------------------------------------------

def _string(node: ast.AST | None, names: dict[str, str]) -> str | None:
    """A string constant, a local string variable, or their concatenation."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string(node.left, names), _string(node.right, names)
        return None if left is None or right is None else left + right
    return None


def _strings(node: ast.AST | None, names: dict[str, str]) -> list[str] | None:
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_string(e, names) for e in node.elts]
        return None if None in items else items  # type: ignore[return-value]
    one = _string(node, names)
    return None if one is None else [one]


def _call_name(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _patterns(call: ast.Call, names: dict[str, str]) -> tuple[list[str] | None, list[str] | None]:
    args = {k.arg: k.value for k in call.keywords}
    src = args.get("source_patterns", call.args[0] if call.args else None)
    dst = args.get("target_patterns", call.args[1] if len(call.args) > 1 else None)
    return _strings(src, names), _strings(dst, names)


class Builder:
    """Runs the statements that build the mapping, on rules instead of objects; anything else is skipped."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases
        self.mapping: dict[str, list[Rule]] = {}
        self.local: dict[str, list[Rule]] = {}
        self.names: dict[str, str] = {}  # local string variables, used to build patterns

    def rules(self, node: ast.AST) -> list[Rule] | None:  # noqa: PLR0911 - one answer per expression form
        if isinstance(node, (ast.List, ast.Tuple)):
            out: list[Rule] = []
            for elt in node.elts:
                part = self.rules(elt.value) if isinstance(elt, ast.Starred) else self.element(elt)
                out += part if part is not None else [{"opaque": "?"}]
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.rules(node.left), self.rules(node.right)
            if left is None and right is None:
                return None
            return (left or [{"opaque": "?"}]) + (right or [{"opaque": "?"}])  # a part we cannot follow stays visible
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "copy":
            return self.rules(node.func.value)
        if isinstance(node, ast.Call) and _call_name(node) in ("deepcopy", "list") and node.args:
            return self.rules(node.args[0])
        if isinstance(node, ast.Subscript) and self._is_mapping(node.value):
            key = self._key(node.slice)
            return list(self.mapping[key]) if key in self.mapping else None
        if isinstance(node, ast.Name) and node.id in self.local:
            return list(self.local[node.id])
        return None

    def element(self, node: ast.AST) -> list[Rule] | None:
        if not isinstance(node, ast.Call):
            return None
        name = _call_name(node)
        if name == "WeightRenaming":
            src, dst = _patterns(node, self.names)
            rule = renaming(src, dst) if src and dst else None
            return [rule] if rule else [{"opaque": name}]
        if name == "WeightConverter" or (name or "").endswith("WeightConverter"):
            src, _ = _patterns(node, self.names)
            return [{"convert": _source_forms(src, [], None)}] if src else [{"opaque": name}]
        return [{"opaque": name or "?"}]  # PrefixChange, LayerPairCollapse, ...: they act on keys we cannot follow

    @staticmethod
    def _is_mapping(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == "mapping"

    @staticmethod
    def _key(node: ast.AST) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    def run(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self.statement(stmt)

    def statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            self.assign(stmt.targets[0], stmt.value)
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
            extra = self.rules(stmt.value)
            if extra is not None:
                self.add(stmt.target, extra)
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and \
                isinstance(stmt.value.func, ast.Attribute) and stmt.value.func.attr in ("append", "extend"):
            # `mapping[key].append(rule)` or `.extend(rules)` (transformers 5.25's minicpm5_moe): an argument we
            # cannot follow stays visible as opaque
            func, args = stmt.value.func, stmt.value.args
            extra = (self.element(args[0]) if func.attr == "append" else self.rules(args[0])) if len(args) == 1 else None
            self.add(func.value, extra or [{"opaque": "?"}])
        elif isinstance(stmt, ast.If):
            self.run(stmt.body)  # e.g. `if hasattr(torch..., "weight_norm")`: the branch a current torch takes
        elif isinstance(stmt, ast.For) and isinstance(stmt.iter, ast.Call) and _call_name(stmt.iter) == "items":
            self.alias_loop()

    def assign(self, target: ast.AST, value: ast.AST) -> None:
        if self._is_mapping(target) and isinstance(value, ast.Dict):
            for k, v in zip(value.keys, value.values):
                key, rules = self._key(k) if k is not None else None, self.rules(v)
                if key is not None and rules is not None:
                    self.mapping[key] = rules
        elif isinstance(target, ast.Subscript) and self._is_mapping(target.value):
            key = self._key(target.slice)
            if key is not None:  # built some other way (a comprehension): transforms we cannot follow
                self.mapping[key] = self.rules(value) or [{"opaque": "?"}]
        elif isinstance(target, ast.Name) and _string(value, self.names) is not None:
            self.names[target.id] = _string(value, self.names)  # type: ignore[assignment]
        elif isinstance(target, ast.Name):
            rules = self.rules(value)
            if rules is not None:
                self.local[target.id] = rules

    def add(self, owner: ast.AST, extra: list[Rule]) -> None:
        """The list `owner` names (`mapping[key]` or a local) grows by `extra`."""
        if isinstance(owner, ast.Subscript) and self._is_mapping(owner.value):
            key = self._key(owner.slice)
            if key is not None:
                self.mapping[key] = self.mapping.get(key, []) + extra
        elif isinstance(owner, ast.Name) and owner.id in self.local:
            self.local[owner.id] += extra

    def alias_loop(self) -> None:
        """`for model_type, base in _MODEL_TO_CONVERSION_PATTERN.items(): mapping[model_type] = mapping[base]`."""
        for name, base in self.aliases.items():
            if name not in self.mapping and base in self.mapping:
                self.mapping[name] = list(self.mapping[base])


def _module_dict(tree: ast.Module, name: str) -> dict[str, str]:
    for stmt in tree.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(stmt.value, ast.Dict):
            return {k.value: v.value for k, v in zip(stmt.value.keys, stmt.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
                    and isinstance(k.value, str) and isinstance(v.value, str)}
    return {}


def parse_mapping(text: str) -> dict[str, list[Rule]]:
    """Every architecture's weight transforms in one release's conversion_mapping.py."""
    tree = ast.parse(text)
    builder = Builder(_module_dict(tree, ALIASES))
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == BUILDER:
            builder.run(stmt.body)
    return builder.mapping


# --- which sub-models an architecture is built from -----------------------------------------

def _self_assignments(cls: ast.ClassDef) -> Iterator[tuple[str, str]]:
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
            for node in ast.walk(fn):
                if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.Call)
                        and isinstance(node.targets[0], ast.Attribute)
                        and isinstance(node.targets[0].value, ast.Name) and node.targets[0].value.id == "self"):
                    name = _call_name(node.value)
                    if name and name[:1].isupper():
                        yield node.targets[0].attr, name


def _class_prefix(cls: ast.ClassDef) -> str | None:
    for stmt in cls.body:
        if (isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "base_model_prefix" for t in stmt.targets)
                and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
            return stmt.value.value
    return None


def parse_submodels(modeling: dict[str, str], keyed: set[str]) -> dict[str, dict[str, Any]]:
    """Architectures whose sub-models (``self.vit = ViTModel(...)``) have transforms of their own, with the
    ``base_model_prefix`` that scopes them."""
    classes: dict[str, ast.ClassDef] = {}
    for text in modeling.values():
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        classes.update({n.name: n for n in tree.body if isinstance(n, ast.ClassDef)})

    def prefix(name: str, depth: int = 0) -> str | None:
        cls = classes.get(name)
        if cls is None or depth > 8:
            return None
        own = _class_prefix(cls)
        if own is not None:
            return own
        bases = [b.id for b in cls.bases if isinstance(b, ast.Name)]
        return next((p for p in (prefix(b, depth + 1) for b in bases) if p is not None), None)

    out: dict[str, dict[str, Any]] = {}
    for name, cls in sorted(classes.items()):
        children = [[attr, child] for attr, child in _self_assignments(cls) if child in keyed and child != name]
        if children:
            out[name] = {"prefix": prefix(name) or "", "children": children}
    return out


# --- the table ------------------------------------------------------------------------------

def _set_id(rules: list[Rule]) -> str:
    return hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()[:10]


def build_table(per_release: list[tuple[str, dict[str, list[Rule]]]], submodels: dict[str, dict[str, Any]]) -> dict:
    """Merge releases into spans: each key's rule set from the release it first appears in (None: gone)."""
    rule_sets: dict[str, list[Rule]] = {}
    keys: dict[str, list[list[str | None]]] = {}
    for version, mapping in per_release:
        for key in sorted(set(mapping) | set(keys)):
            rules = mapping.get(key)
            set_id = None
            if rules:
                set_id = _set_id(rules)
                rule_sets[set_id] = rules
            spans = keys.setdefault(key, [])
            if (spans[-1][1] if spans else None) != set_id:
                spans.append([version, set_id])
    keys = {k: v for k, v in keys.items() if any(s[1] for s in v)}
    used = {s[1] for spans in keys.values() for s in spans if s[1]}
    return {
        "schema": 1,
        "source": "transformers/conversion_mapping.py (_build_checkpoint_conversion_mapping) and models/*/modeling_*.py "
                  "of each release read, parsed with ast by tools/regenerate_transformers_renames.py",
        "releases": [v for v, _ in per_release],
        "semantics": "A key (class name first, then model_type) maps to its transforms from the release in each span. "
                     "Renamings apply in order, each to the first match of its alternation (src, longest first) in the "
                     "key, the match replaced by dst (\\N: the branch's Nth group); 'convert' merges or splits tensors, "
                     "'opaque' is a transform not followed here. A sub-model's transforms apply under its attribute "
                     "path, less the architecture's base_model_prefix. 'legacy' applies to every model.",
        "keys": keys,
        "rule_sets": {k: rule_sets[k] for k in sorted(used)},
        "submodels": {k: v for k, v in submodels.items()
                      if any(child in keys for _, child in v["children"])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", nargs="+", metavar="VERSION", help="read only these releases")
    parser.add_argument("--all", action="store_true", help="read every final 5.x release, not one per minor")
    args = parser.parse_args(argv)
    with urllib.request.urlopen(INDEX_URL, timeout=60) as response:
        wheels = list_wheels(json.load(response), every=args.all or bool(args.only))
    if args.only:
        wheels = [w for w in wheels if w.version in set(args.only)]
    per_release: list[tuple[str, dict[str, list[Rule]]]] = []
    modeling: dict[str, str] = {}
    for wheel in wheels:
        sources = read_wheel(fetch(wheel, args.cache))
        if MAPPING_FILE not in sources:
            continue
        per_release.append((wheel.version, parse_mapping(sources[MAPPING_FILE])))
        modeling = {k: v for k, v in sources.items() if k != MAPPING_FILE}  # the newest release's classes
        print(f"{wheel.version}: {len(per_release[-1][1])} keys", file=sys.stderr)
    keyed = {k for _, m in per_release for k in m if k[:1].isupper()}
    table = build_table(per_release, parse_submodels(modeling, keyed))
    args.out.write_text(json.dumps(table, indent=0, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
