"""Regenerate peft_releases.json: what each published PEFT release accepts and how it loads configs.

    python tools/regenerate_peft_table.py [--out PATH] [--cache DIR] [--only VERSIONS]

Every fact is read from a release's source with ``ast``. PEFT code is never imported or run, so
the table can be rebuilt without torch, and no installed PEFT can leak into it.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urljoin

from packaging.version import InvalidVersion, Version

INDEX_URL = "https://pypi.org/pypi/peft/json"
DEFAULT_CACHE = Path.home() / ".cache" / "adapter-doctor" / "peft-wheels"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "doctor" / "knowledge" / "peft_releases.json"
CONFIG_MAPPING = "PEFT_TYPE_TO_CONFIG_MAPPING"
EMPTY_FACTORIES = {"list": [], "dict": {}, "set": [], "tuple": []}
JSON_READERS = ("from_json_file", "load")  # PeftConfig.from_json_file, json.load

Spec = dict[str, Any]
Located = tuple[str, Any]  # (dotted module name, ast node defined there)


# --- PyPI ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Release:
    version: str
    date: str
    url: str
    filename: str
    sha256: str
    yanked: bool


def list_releases(index: dict) -> list[Release]:
    """Final releases in a PyPI JSON index, oldest first, each with its wheel (or sdist)."""
    releases = []
    for version, files in index["releases"].items():
        try:
            parsed = Version(version)
        except InvalidVersion:
            continue
        archives = sorted((f for f in files if f["packagetype"] in ("bdist_wheel", "sdist")),
                          key=lambda f: (f["packagetype"] != "bdist_wheel", f["filename"]))
        if parsed.is_prerelease or parsed.is_devrelease or not archives:
            continue
        chosen = archives[0]
        date = min(f.get("upload_time_iso_8601") or f["upload_time"] for f in files)[:10]
        url = urljoin(INDEX_URL, chosen["url"])  # mirrors may answer with relative links
        yanked = any(f.get("yanked") for f in files)
        releases.append(Release(version, date, url, chosen["filename"], chosen["digests"]["sha256"], yanked))
    return sorted(releases, key=lambda r: Version(r.version))


def fetch(release: Release, cache: Path) -> Path | None:
    """The cached archive of a release, downloaded once; None for a yanked one that is gone."""
    path = cache / release.filename
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == release.sha256:
        return path
    try:
        with urllib.request.urlopen(release.url, timeout=120) as response:
            data = response.read()
    except OSError:
        if release.yanked:
            return None
        raise
    if hashlib.sha256(data).hexdigest() != release.sha256:
        raise RuntimeError(f"checksum mismatch for {release.filename}")
    path.write_bytes(data)
    return path


def read_sources(archive: Path) -> dict[str, str]:
    """Map each ``.py`` file of the ``peft`` package, as ``peft/...``, to its text."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            members = {n: zf.read(n) for n in zf.namelist() if n.endswith(".py")}
    else:
        with tarfile.open(archive) as tf:
            files = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".py")]
            members = {m.name: tf.extractfile(m).read() for m in files}
    sources = {}
    for name, data in members.items():
        parts = name.split("/")
        # wheels start at peft/; sdists nest it under peft-X/ or peft-X/src/
        starts = [i for i, p in enumerate(parts) if p == "peft" and (i <= 1 or parts[i - 1] == "src")]
        if starts:
            sources["/".join(parts[starts[0]:])] = data.decode("utf-8")
    return sources


# --- one release's source tree ------------------------------------------------------------

def _name(node: ast.AST | None) -> str | None:
    """The trailing name of ``x`` or ``a.b.x``."""
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _mentions(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(node))


def _flat(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Module-level statements, including those under top-level ``if``/``try`` (optional imports)."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            yield from _flat(stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _flat(stmt.body + stmt.orelse + stmt.finalbody + [s for h in stmt.handlers for s in h.body])


class SourceTree:
    """A release's modules; names resolve by following imports, as Python would.

    Following imports matters: some wheels ship stale modules (0.5.0 still carries the old
    ``peft/utils/config.py``), so searching the tree for a class name could find a dead copy.
    """

    def __init__(self, sources: dict[str, str]):
        self.sources: dict[str, str] = {}
        self.packages: set[str] = set()
        self._parsed: dict[str, ast.Module] = {}
        for path, text in sources.items():
            dotted = path[:-3].replace("/", ".")
            if dotted.endswith(".__init__"):
                dotted = dotted[: -len(".__init__")]
                self.packages.add(dotted)
            self.sources[dotted] = text

    def module(self, name: str) -> ast.Module | None:
        # parsing every module is most of the run time; parse only what is consulted
        if name not in self._parsed and name in self.sources:
            self._parsed[name] = ast.parse(self.sources[name])
        return self._parsed.get(name)

    def resolve(self, module: str, name: str, depth: int = 0) -> Located | None:
        """The class that ``name`` denotes in ``module``, as ``(defining module, ClassDef)``."""
        tree = self.module(module)
        if tree is None or depth > 20:
            return None
        statements = list(_flat(tree.body))
        for stmt in statements:
            if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                return module, stmt
        for stmt in statements:
            for alias in stmt.names if isinstance(stmt, ast.ImportFrom) else []:
                if alias.name == "*" or (alias.asname or alias.name) == name:
                    imported = name if alias.name == "*" else alias.name
                    found = self.resolve(self._import_target(module, stmt), imported, depth + 1)
                    if found:
                        return found
        return None

    def _import_target(self, module: str, stmt: ast.ImportFrom) -> str:
        if not stmt.level:
            return stmt.module or ""
        parts = module.split(".") if module in self.packages else module.split(".")[:-1]
        parts = parts[: len(parts) - stmt.level + 1]
        return ".".join(parts + ([stmt.module] if stmt.module else []))

    def mro(self, module: str, cls: ast.ClassDef) -> list[Located]:
        """The class and its bases found in the tree, most derived first (depth-first suffices here)."""
        chain = [(module, cls)]
        for base in cls.bases:
            found = self.resolve(module, base.id) if isinstance(base, ast.Name) else None
            if found and found[1] is not cls:
                chain += [entry for entry in self.mro(*found) if entry not in chain]
        return chain

    def enum_members(self, module: str, name: str) -> dict[str, str]:
        """Member name -> value of the enum ``name`` as seen from ``module``; empty if not an enum."""
        found = self.resolve(module, name)
        if not found or not any((_name(b) or "").endswith("Enum") for b in found[1].bases):
            return {}
        return {s.targets[0].id: str(s.value.value) for s in found[1].body
                if isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name)
                and not s.targets[0].id.startswith("_") and isinstance(s.value, ast.Constant)}


# --- dataclass fields ---------------------------------------------------------------------

def to_json(value: Any) -> Any:
    """A literal Python value as JSON data; ValueError when JSON cannot hold it faithfully."""
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_json(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: to_json(v) for k, v in value.items()}
    raise ValueError(f"not representable in JSON: {value!r}")


def default_value(node: ast.expr, tree: SourceTree, module: str) -> Any:
    """A default as JSON: a literal, an enum member's value, or ``{"$expr": source}``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        members = tree.enum_members(module, node.value.id)
        if node.attr in members:
            return members[node.attr]
    try:
        return to_json(ast.literal_eval(node))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return {"$expr": ast.unparse(node)}


def factory_value(node: ast.expr, tree: SourceTree, module: str) -> Any:
    """What a ``default_factory`` produces, in the same form as a plain default."""
    if isinstance(node, ast.Name) and node.id in EMPTY_FACTORIES:
        return EMPTY_FACTORIES[node.id]
    if isinstance(node, ast.Lambda) and not node.args.args:
        return default_value(node.body, tree, module)
    return {"$expr": f"{ast.unparse(node)}()"}


def field_spec(stmt: ast.AnnAssign, tree: SourceTree, module: str) -> Spec:
    """One field's annotation and default (or ``required``), plus ``init: false`` when set."""
    annotation = stmt.annotation
    # a string annotation is a forward reference: keep what it says, not its quotes
    text = annotation.value if isinstance(annotation, ast.Constant) else ast.unparse(annotation)
    spec: Spec = {"annotation": str(text)}
    value = stmt.value
    if not (isinstance(value, ast.Call) and _name(value.func) == "field"):
        spec.update({"required": True} if value is None else {"default": default_value(value, tree, module)})
        return spec
    kwargs = {k.arg: k.value for k in value.keywords if k.arg}
    if isinstance(kwargs.get("init"), ast.Constant) and kwargs["init"].value is False:
        spec["init"] = False
    if "default" in kwargs:
        spec["default"] = default_value(kwargs["default"], tree, module)
    elif "default_factory" in kwargs:
        spec["default"] = factory_value(kwargs["default_factory"], tree, module)
    else:
        spec["required"] = True
    return spec


def _is_field(stmt: ast.stmt) -> bool:
    if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
        return False
    annotation = stmt.annotation.value if isinstance(stmt.annotation, ast.Subscript) else stmt.annotation
    return not stmt.target.id.startswith("_") and _name(annotation) != "ClassVar"


def dataclass_fields(tree: SourceTree, module: str, cls: ast.ClassDef) -> dict[str, Spec]:
    """All dataclass fields of ``cls``, inherited ones included; a subclass overrides its bases."""
    fields: dict[str, Spec] = {}
    for base_module, base in reversed(tree.mro(module, cls)):
        # only dataclasses contribute: a plain base's annotations are not fields
        if any(_name(d.func if isinstance(d, ast.Call) else d) == "dataclass" for d in base.decorator_list):
            fields.update({s.target.id: field_spec(s, tree, base_module) for s in base.body if _is_field(s)})
    return fields


def _registrations(mod: ast.Module) -> Iterator[tuple[ast.expr | None, ast.expr | None]]:
    """(peft type, config class) pairs a module declares, in each form PEFT has used."""
    for node in ast.walk(mod):
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(_name(t) == CONFIG_MAPPING for t in targets):
            if isinstance(node.value, ast.Dict):  # PEFT_TYPE_TO_CONFIG_MAPPING = {"LORA": LoraConfig, ...}
                yield from zip(node.value.keys, node.value.values)
        elif isinstance(node, ast.Assign) and isinstance(targets[0], ast.Subscript):
            if _name(targets[0].value) == CONFIG_MAPPING:  # PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.X] = XConfig
                yield targets[0].slice, node.value
        elif isinstance(node, ast.Call) and _name(node.func) == "register_peft_method":
            kwargs = {k.arg: k.value for k in node.keywords}
            name = kwargs.get("name")
            if isinstance(name, ast.Constant) and isinstance(name.value, str):  # the registry upper-cases it
                yield ast.Constant(name.value.upper()), kwargs.get("config_cls")


def config_classes(tree: SourceTree, peft_types: dict[str, str]) -> dict[str, Located]:
    """PeftType value -> config class, for every PeftType member the release maps to a config."""
    found: dict[str, Located] = {}
    for module, text in sorted(tree.sources.items()):
        if CONFIG_MAPPING not in text and "register_peft_method" not in text:
            continue
        for key, cls in _registrations(tree.module(module)):
            if isinstance(key, ast.Attribute):
                key = ast.Constant(peft_types.get(key.attr))
            resolved = tree.resolve(module, cls.id) if isinstance(cls, ast.Name) else None
            if isinstance(key, ast.Constant) and key.value in peft_types.values() and resolved:
                found[key.value] = resolved
    return found


# --- loading behaviour --------------------------------------------------------------------

def tainted_names(func: ast.FunctionDef, seeds: set[str]) -> set[str]:
    """Names holding the loaded JSON, or data built from it, following assignments in source order."""
    tainted = set(seeds)
    assigns = [n for n in ast.walk(func) if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None]
    for node in sorted(assigns, key=lambda n: (n.lineno, n.col_offset)):
        targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
        names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        reads_json = any(isinstance(n, ast.Call) and _name(n.func) in JSON_READERS for n in ast.walk(node.value))
        tainted = tainted | names if reads_json or _mentions(node.value, tainted) else tainted - names
    return tainted


def _splats(call: ast.Call, names: set[str]) -> bool:
    """True for ``f(**x)`` where ``x`` is one of ``names``."""
    return any(k.arg is None and _mentions(k.value, names) for k in call.keywords)


def _warns_on_typeerror(handler: ast.ExceptHandler) -> bool:
    caught = {_name(n) for n in ast.walk(handler.type)} if handler.type else set()
    calls = [_name(n.func) or "" for n in ast.walk(handler) if isinstance(n, ast.Call)]
    return "TypeError" in caught and any("warn" in c for c in calls)


def _shielded(func: ast.FunctionDef) -> set[int]:
    """Ids of nodes inside a ``try`` whose ``except TypeError`` warns instead of failing."""
    tries = [t for t in ast.walk(func) if isinstance(t, ast.Try) and any(map(_warns_on_typeerror, t.handlers))]
    return {id(n) for t in tries for stmt in t.body for n in ast.walk(stmt)}


def _is_hasattr_setattr_loop(node: ast.AST, tainted: set[str]) -> bool:
    """``for k, v in <json>.items(): if hasattr(config, k): setattr(config, k, v)``."""
    if not (isinstance(node, ast.For) and _mentions(node.iter, tainted)):
        return False
    guards = [n for n in ast.walk(node) if isinstance(n, ast.If) and _name(getattr(n.test, "func", None)) == "hasattr"]
    return any(isinstance(c, ast.Call) and _name(c.func) == "setattr" for g in guards for c in ast.walk(g))


def _loading_outcomes(methods: dict[str, ast.FunctionDef], name: str, seeds: set[str], seen: set[str]) -> set[str]:
    """What happens to JSON keys inside loader ``name`` and the classmethods it hands them to."""
    seen.add(name)
    func, outcomes = methods[name], set()
    tainted = tainted_names(func, seeds)
    shielded = _shielded(func)
    for node in ast.walk(func):
        if _is_hasattr_setattr_loop(node, tainted):
            outcomes.add("ignore")
        if not (isinstance(node, ast.Call) and _splats(node, tainted)):
            continue
        callee = _name(node.func)
        if isinstance(node.func, ast.Attribute) and callee in methods:
            # the JSON is passed on (e.g. to from_peft_type): follow it into that method's **kwargs
            if callee not in seen:
                kwarg = methods[callee].args.kwarg
                outcomes |= _loading_outcomes(methods, callee, {kwarg.arg} if kwarg else set(), seen)
        else:
            outcomes.add("warn" if id(node) in shielded else "raise")
    return outcomes


def unknown_key_handling(methods: dict[str, ast.FunctionDef]) -> str | None:
    """How ``from_pretrained`` treats a JSON key the config's ``__init__`` does not accept."""
    if "from_pretrained" not in methods:
        return None  # nothing loads a saved config in this release
    outcomes = _loading_outcomes(methods, "from_pretrained", set(), set())
    return next((o for o in ("warn", "raise", "ignore") if o in outcomes), None)


def _reads_key_unguarded(node: ast.AST, key: str, tainted: set[str], guarded: bool = False) -> bool:
    """True when ``<json>[key]`` is read outside the body of an ``if key in ...``."""
    if isinstance(node, ast.Subscript) and not guarded and _mentions(node.value, tainted):
        if isinstance(node.slice, ast.Constant) and node.slice.value == key:
            return True
    if isinstance(node, ast.If):
        test = node.test
        guards = (isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.In)
                  and getattr(test.left, "value", None) == key)
        return (any(_reads_key_unguarded(n, key, tainted, guarded or guards) for n in node.body)
                or any(_reads_key_unguarded(n, key, tainted, guarded) for n in [test, *node.orelse]))
    return any(_reads_key_unguarded(child, key, tainted, guarded) for child in ast.iter_child_nodes(node))


def _required_key_sets(mod: ast.Module, key: str) -> set[str]:
    """Module-level names bound to a literal collection listing ``key`` (MIN_EXPECTED_CONFIG_KEYS)."""
    names = set()
    for stmt in mod.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, (ast.Set, ast.List, ast.Tuple)):
            if any(getattr(e, "value", None) == key for e in stmt.value.elts):
                names |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    return names


def _raises(node: ast.AST, exc: str) -> bool:
    return any(isinstance(n, ast.Raise) and _name(n.exc.func if isinstance(n.exc, ast.Call) else n.exc) == exc
               for n in ast.walk(node))


def peft_type_handling(tree: SourceTree, methods: dict[str, Located]) -> str | None:
    """What loading does when ``peft_type`` is missing from the JSON."""
    for module, func in methods.values():
        required = _required_key_sets(tree.module(module), "peft_type")
        checks = [n for n in ast.walk(func) if isinstance(n, ast.If) and _mentions(n.test, required)]
        if any(_raises(n, "TypeError") for n in checks):
            return "typeerror"
    loaders = [func for _, func in methods.values()]
    model = tree.module("peft.peft_model")
    if model:  # PeftModel.from_pretrained looks the type up before any config class is chosen
        loaders += [n for n in ast.walk(model) if isinstance(n, ast.FunctionDef) and n.name == "from_pretrained"]
    for func in loaders:
        if _reads_key_unguarded(func, "peft_type", tainted_names(func, set())):
            return "keyerror"
        # MAPPING[PeftConfig.from_pretrained(...).peft_type]: a config loaded without the key has
        # peft_type None, and None is not a mapping key
        if any(isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Attribute)
               and n.slice.attr == "peft_type" and isinstance(n.slice.value, ast.Call)
               for n in ast.walk(func)):
            return "keyerror"
    return None


def validates_task_type(methods: dict[str, Located]) -> bool:
    """True when ``__post_init__`` raises for a ``task_type`` that is ``not in`` ``TaskType``."""
    if "__post_init__" not in methods:
        return False
    for node in ast.walk(methods["__post_init__"][1]):
        raises = isinstance(node, ast.If) and any(isinstance(n, ast.Raise) for n in node.body)
        if raises and _mentions(node.test, {"TaskType"}):
            compares = [c for c in ast.walk(node.test) if isinstance(c, ast.Compare)]
            if any(isinstance(op, ast.NotIn) and "task_type" in ast.unparse(c.left) for c in compares for op in c.ops):
                return True
    return False


def modules_to_save_match(tree: SourceTree) -> str | None:
    """How ``_set_trainable`` tests a name against ``modules_to_save``: ``suffix`` for ``key.endswith(target)`` on
    module names (0.3+), ``substring`` for ``target in name`` on parameter names (0.1, 0.2)."""
    for module in ("peft.utils.other", "peft.utils"):
        parsed = tree.module(module)
        funcs = [n for n in ast.walk(parsed) if isinstance(n, ast.FunctionDef) and n.name == "_set_trainable"] if parsed else []
        for gen in (n for func in funcs for n in ast.walk(func) if isinstance(n, ast.GeneratorExp)):
            if isinstance(gen.elt, ast.Call) and _name(gen.elt.func) == "endswith":
                return "suffix"
            if isinstance(gen.elt, ast.Compare) and isinstance(gen.elt.ops[0], ast.In):
                return "substring"
    return None


def _mentions_attr_or_name(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name or isinstance(n, ast.Attribute) and n.attr == name
               for n in ast.walk(node))


def lora_init_values(tree: SourceTree) -> dict[str, list[str]] | None:
    """The string values of ``init_lora_weights`` that LoRA's layer code acts on: compared with ``==`` (also after
    ``.lower()``) or matched with ``.startswith``. Any other string reaches ``reset_lora_parameters``, which raises
    ``Unknown initialization`` (the Literal annotation lags the code: 0.21 handles "lora_ga" without listing it)."""
    module = next((m for m in ("peft.tuners.lora.layer", "peft.tuners.lora") if tree.module(m)), None)
    if module is None:
        return None
    equals, prefixes = set(), set()
    for node in ast.walk(tree.module(module)):
        if isinstance(node, ast.Compare) and _mentions_attr_or_name(node.left, "init_lora_weights"):
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.Eq, ast.In)) and isinstance(right, ast.Constant) and isinstance(right.value, str):
                    equals.add(right.value)
        elif (isinstance(node, ast.Call) and _name(node.func) == "startswith" and node.args
              and _mentions_attr_or_name(node.func, "init_lora_weights") and isinstance(node.args[0], ast.Constant)):
            prefixes.add(node.args[0].value)
    raises = any(isinstance(n, ast.Raise) and any(isinstance(c, ast.Constant) and "Unknown initialization" in str(c.value)
                                                  for c in ast.walk(n)) for n in ast.walk(tree.module(module)))
    if not (equals or prefixes):
        return None
    return {"equals": sorted(equals), "prefixes": sorted(prefixes), "other_strings": "raise" if raises else "as-true"}


# --- assembling the table -----------------------------------------------------------------

_OPS = {ast.NotEq: "!=", ast.Eq: "==", ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<="}


def _warning_text(body: list[ast.stmt]) -> str | None:
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.Call) and _name(node.func) == "warn" and node.args:
            parts = [v.value for v in ast.walk(node.args[0]) if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            return "".join(parts)[:200] or None
    return None


def value_warnings(tree: SourceTree, module: str, cls: ast.ClassDef) -> list[dict[str, Any]]:
    """`if self.<field> <op> <constant>: warnings.warn(...)` in a config's __post_init__ (its bases' too)."""
    found = []
    for _, base in tree.mro(module, cls):
        post = next((f for f in base.body if isinstance(f, ast.FunctionDef) and f.name == "__post_init__"), None)
        for node in ast.walk(post) if post else ():
            test = node.test if isinstance(node, ast.If) else None
            if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _OPS):
                continue
            left, right = test.left, test.comparators[0]
            if isinstance(left, ast.Attribute) and _name(left.value) == "self" and isinstance(right, ast.Constant):
                message = _warning_text(node.body)
                if message:
                    found.append({"field": left.attr, "op": _OPS[type(test.ops[0])], "value": right.value,
                                  "message": message})
    return found


def dispatches(methods: dict[str, Located]) -> bool:
    """Does PeftConfig.from_pretrained build the class the file's peft_type names (0.5+), or PeftConfig itself?"""
    if "from_pretrained" not in methods:
        return False
    func = methods["from_pretrained"][1]
    helpers = {_name(n.func) for n in ast.walk(func) if isinstance(n, ast.Call)} & set(methods) - {"from_pretrained"}
    return _mentions(func, {CONFIG_MAPPING}) or any(_mentions(methods[h][1], {CONFIG_MAPPING}) for h in helpers)


def unknown_key_filter(methods: dict[str, Located]) -> str | None:
    """Which class's signature the warn-and-drop path filters keys by: the dispatched one, or the caller (0.14.0)."""
    for _, func in methods.values():
        for node in ast.walk(func):
            if isinstance(node, ast.Call) and _name(node.func) == "_check_and_remove_unused_kwargs" and node.args:
                return "caller" if _name(node.args[0]) == "cls" else "dispatched"
    return None


SAFETENSORS_ADAPTER = "adapter_model.safetensors"
_SAFETENSORS_READERS = {"safetensors.torch": {"load_file", "load"}, "safetensors": {"safe_open"}}


def reads_safetensors(tree: SourceTree) -> bool:
    """Does a function of the release both name adapter_model.safetensors and read it with safetensors?

    Releases before that only look for adapter_model.bin: an adapter converted to safetensors does not load there.
    """
    constants = set()  # names bound to the file name (SAFETENSORS_WEIGHTS_NAME)
    for module, text in tree.sources.items():
        if SAFETENSORS_ADAPTER in text:
            for stmt in _flat(tree.module(module).body):
                if isinstance(stmt, ast.Assign) and getattr(stmt.value, "value", None) == SAFETENSORS_ADAPTER:
                    constants |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    for module, text in sorted(tree.sources.items()):
        if "safetensors" not in text:
            continue
        mod = tree.module(module)
        readers = {alias.asname or alias.name for node in ast.walk(mod) if isinstance(node, ast.ImportFrom)
                   for alias in node.names if alias.name in _SAFETENSORS_READERS.get(node.module or "", ())}
        for func in (n for n in ast.walk(mod) if isinstance(n, ast.FunctionDef)) if readers else ():
            names_file = _mentions(func, constants) or any(
                isinstance(n, ast.Constant) and n.value == SAFETENSORS_ADAPTER for n in ast.walk(func))
            if names_file and any(isinstance(n, ast.Call) and _name(n.func) in readers for n in ast.walk(func)):
                return True
    return False


def analyse(version: str, date: str, sources: dict[str, str]) -> dict[str, Any]:
    """Everything the table records about one release."""
    tree = SourceTree(sources)
    peft_types = tree.enum_members("peft", "PeftType")
    base = tree.resolve("peft", "PeftConfig")
    methods: dict[str, Located] = {}
    for module, cls in reversed(tree.mro(*base) if base else []):
        methods.update({f.name: (module, f) for f in cls.body if isinstance(f, ast.FunctionDef)})
    classes = config_classes(tree, peft_types)
    configs = {pt: (cls.name, dataclass_fields(tree, module, cls)) for pt, (module, cls) in classes.items()}
    warns = {pt: w for pt, (module, cls) in classes.items() if (w := value_warnings(tree, module, cls))}
    release = {
        "version": version,
        "date": date,
        "unknown_keys": unknown_key_handling({name: func for name, (_, func) in methods.items()}),
        "task_type_validated": validates_task_type(methods),
        "peft_type_required": peft_type_handling(tree, methods),
        "peft_types": list(peft_types.values()),
        "task_types": list(tree.enum_members("peft", "TaskType").values()),
        "value_warnings": dict(sorted(warns.items())),
        "dispatches_on_peft_type": dispatches(methods),
        "unknown_keys_filter": unknown_key_filter(methods),
        "reads_safetensors": reads_safetensors(tree),
        "modules_to_save_match": modules_to_save_match(tree),
        "lora_init_values": lora_init_values(tree),
    }
    return {"release": release, "configs": configs}


def field_spans(versions: list[str], history: list[Spec | None]) -> list[Spec]:
    """Collapse per-release specs of one field into spans; a gap or any change starts a new span."""
    spans: list[Spec] = []
    previous = None
    for version, spec in zip(versions, history):
        # compare as JSON: in Python 1 == 1.0 == True, but a default changing between them is news
        current = json.dumps(spec, sort_keys=True) if spec is not None else None
        if current is not None and current == previous:
            spans[-1]["to"] = version
        elif current is not None:
            spans.append({"from": version, "to": version, **spec})
        previous = current
    return spans


def build_table(analyses: list[dict[str, Any]]) -> dict[str, Any]:
    versions = [a["release"]["version"] for a in analyses]
    configs: dict[str, Any] = {}
    for peft_type in sorted({pt for a in analyses for pt in a["configs"]}):
        present = [a["configs"].get(peft_type) for a in analyses]
        names = sorted({name for entry in present if entry for name in entry[1]})
        configs[peft_type] = {
            "class": [entry[0] for entry in present if entry][-1],
            "fields": {name: field_spans(versions, [entry[1].get(name) if entry else None for entry in present])
                       for name in names},
        }
    return {
        "schema": 1,
        "source": "parsed from the published peft wheels on PyPI",
        "releases": [a["release"] for a in analyses],
        "configs": configs,
    }


def summarise(table: dict[str, Any]) -> str:
    releases = table["releases"]
    lines = [f"{len(releases)} releases, {releases[0]['version']} .. {releases[-1]['version']}",
             "version   unknown_keys  peft_type_required  task_type_validated"]
    lines += [f"{r['version']:<9} {r['unknown_keys']!s:<13} {r['peft_type_required']!s:<19} {r['task_type_validated']}"
              for r in releases]
    lines.append("LORA fields by first release (spans: how often the default/annotation changed):")
    lora = table["configs"].get("LORA", {}).get("fields", {})
    for name, spans in sorted(lora.items(), key=lambda item: (Version(item[1][0]["from"]), item[0])):
        lines.append(f"  {spans[0]['from']:<8} {name}  (to {spans[-1]['to']}, {len(spans)} span(s))")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON table")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where downloaded archives are kept")
    parser.add_argument("--only", help="comma-separated versions to include, e.g. 0.4.0,0.5.0")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(INDEX_URL, timeout=60) as response:
        releases = list_releases(json.load(response))
    if args.only:
        wanted = {Version(v) for v in args.only.split(",")}
        releases = [r for r in releases if Version(r.version) in wanted]
    analyses = []
    for release in releases:
        archive = fetch(release, args.cache)
        if archive is None:
            print(f"skipping yanked {release.version}: its archive cannot be downloaded", file=sys.stderr)
            continue
        analyses.append(analyse(release.version, release.date, read_sources(archive)))
    if not analyses:
        parser.error("no release matched")
    table = build_table(analyses)
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(summarise(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
