"""config-invalid: adapter_config.json is missing, unreadable, not PEFT's, or holds impossible values."""
from __future__ import annotations

from typing import Iterator

from ..annotations import fits
from ..config_kind import LORA_HINT_KEYS, foreign_tool
from ..finding import Finding, Fix, Severity, brief
from ..knowledge import peft_table
from ..user_regex import pathological, pathological_keys
from . import Check, Context, register, runner

CAT = "config-invalid"
MISSING = Check("ADC101", CAT, Severity.ERROR, "adapter_config.json is missing",
                "PEFT needs adapter_config.json beside the weights to know the method, rank and target modules; "
                "without it `PeftModel.from_pretrained` raises `ValueError: Can't find 'adapter_config.json'`.",
                manual="Restore adapter_config.json from where the adapter was trained (it is small and often left out of uploads).")
BAD_JSON = Check("ADC102", CAT, Severity.ERROR, "adapter_config.json is not valid JSON",
                 "PEFT reads the config with `json.load`, which raises on any syntax error, Python literal (None, True) "
                 "or non-UTF-8 byte.", manual="Edit the file at the line and column shown.")
EMPTY = Check("ADC103", CAT, Severity.ERROR, "adapter_config.json is empty",
              "An empty config usually means an interrupted save or upload.",
              manual="Restore the file from where the adapter was trained.")
LFS = Check("ADC104", CAT, Severity.ERROR, "adapter_config.json is a Git LFS pointer",
            "The repository stored the file in Git LFS, and this clone holds only the pointer text.",
            manual="Install git-lfs and run `git lfs pull` in the repository.")
FOREIGN = Check("ADC105", CAT, Severity.ERROR, "Not a PEFT adapter config",
                "The file shares PEFT's name but was written by another tool (MLX, AdapterHub, ...). "
                "PEFT cannot load it; use the tool that wrote it.")
NO_TYPE = Check("ADC106", CAT, Severity.ERROR, "peft_type is missing",
                "PEFT picks the config class from `peft_type`. Without it, PEFT 0.15+ raises TypeError (missing "
                "required keys) and older releases raise KeyError or TypeError.",
                fixer="migrate-config")
BAD_TYPE = Check("ADC107", CAT, Severity.ERROR, "Unknown peft_type",
                 "No PEFT release defines this peft_type, so no release can load the adapter.")
BAD_VALUE = Check("ADC108", CAT, Severity.ERROR, "A config value has the wrong type or range",
                  "PEFT accepts the value when reading the config but fails, or misbehaves, when it builds the "
                  "layers (e.g. `nn.Linear` with a string rank).", manual="Correct the value in adapter_config.json.")
PATHOLOGICAL = Check("ADC109", CAT, Severity.WARNING, "A regular expression in the config can make matching hang",
                     "PEFT matches target_modules and exclude_modules with `re.fullmatch`, and rank_pattern and "
                     "alpha_pattern keys with `re.match`, on every module name. Python's regex engine backtracks: a "
                     "nested quantifier such as `(a*)*b` takes time exponential in the name's length, and several "
                     "unanchored `.*` a high power of it. Loading can then hang. doctor does not run such a pattern, "
                     "so the checks that need it are skipped.",
                     manual="Rewrite the pattern without nested or stacked quantifiers, or list the module names.")
register(MISSING, BAD_JSON, EMPTY, LFS, FOREIGN, NO_TYPE, BAD_TYPE, BAD_VALUE, PATHOLOGICAL)
_MAX_PATTERNS = 256  # patterns bounded per config: each costs a parse


@runner
def check(ctx: Context) -> Iterator[Finding]:
    art = ctx.artifact
    path = str(art.config_path)
    problem = art.config_problem
    if problem is not None:
        yield from _problem_findings(ctx, problem, path)
        return
    config = art.config
    assert config is not None
    peft_type = config.get("peft_type")
    if peft_type is None:
        yield from _without_peft_type(ctx, config, path)
        return
    known = peft_table().all_peft_types()
    if not isinstance(peft_type, str) or peft_type not in known:
        lora_like = sorted(LORA_HINT_KEYS & config.keys())
        hint = (f" Its fields ({', '.join(lora_like)}) are LoRA's: \"peft_type\": \"LORA\" is probably meant."
                if len(lora_like) >= 2 else " A misspelling, or a method from a fork of PEFT?")
        yield BAD_TYPE.finding(f"peft_type is {brief(peft_type)}, which no PEFT release defines.{hint}",
                               ctx.config_file("peft_type"))
        return
    yield from _value_findings(ctx, config, peft_type)


def _problem_findings(ctx: Context, problem, path: str) -> Iterator[Finding]:
    art = ctx.artifact
    if problem.kind == "missing":
        if art.kind != "config-only":
            yield MISSING.finding(f"{path} does not exist, but weights do", path)
        return
    if problem.kind == "empty":
        yield EMPTY.finding(f"{path}: {problem.message}", path)
    elif problem.kind == "lfs-pointer":
        yield LFS.finding(f"{path}: {problem.message}", path)
    else:
        where = f" at line {problem.line} column {problem.column}" if problem.line else ""
        title = {"python-literal": "adapter_config.json uses Python literals",
                 "too-large": "adapter_config.json is too large to check"}.get(problem.kind, BAD_JSON.title)
        yield BAD_JSON.finding(f"{path}{where}: {problem.message}", path, title=title)


def _without_peft_type(ctx: Context, config: dict, path: str) -> Iterator[Finding]:
    foreign = foreign_tool(config)
    if foreign is not None:
        keys, what = foreign
        yield FOREIGN.finding(f"{path} is {what}, not a PEFT adapter config (it has {', '.join(sorted(keys))})",
                              path, title=f"This is {what.split(' (')[0].removeprefix('an ').removeprefix('a ')}, not PEFT")
        return
    lora_like = LORA_HINT_KEYS & config.keys()
    if len(lora_like) >= 2:
        yield NO_TYPE.finding(
            f"{path} has LoRA fields ({', '.join(sorted(lora_like))}) but no peft_type; PEFT cannot pick a config "
            "class. Adding \"peft_type\": \"LORA\" makes it loadable.",
            ctx.config_file("peft_type"),
        )
        return
    yield FOREIGN.finding(
        f"{path} has no peft_type and none of PEFT's LoRA fields (keys: {', '.join(sorted(config)[:6]) or 'none'})",
        path,
    )


def _value_findings(ctx: Context, config: dict, peft_type: str) -> Iterator[Finding]:
    table = peft_table()
    newest = table.fields(peft_type, table.newest)
    for key, value in config.items():
        spec = ctx.target_fields.get(key) or newest.get(key)
        # `revision: str = None` (0.4-0.6): PEFT writes that null itself, and reads it back as the default.
        if value is None and spec is not None and spec.default is None:
            continue
        if spec is not None and spec.annotation and not fits(value, spec.annotation):
            if newer_value(key, value, newest):
                continue  # a value a later release added (init_lora_weights="lora_ga"): ADC202 says so
            yield BAD_VALUE.finding(f"{key} is {brief(value)} ({_json_type(value)}); PEFT declares it as {spec.annotation}",
                                    ctx.config_file(key))
    yield from _range_findings(ctx, config)
    yield from _pattern_findings(ctx, config)


def _pattern_findings(ctx: Context, config: dict) -> Iterator[Finding]:
    for field in ("target_modules", "exclude_modules"):
        pattern = config.get(field)
        if isinstance(pattern, str) and pattern != "all-linear":
            why = pathological(pattern)
            if why:
                yield PATHOLOGICAL.finding(f"{field} {brief(pattern)}: {why}", ctx.config_file(field))
    for field in ("rank_pattern", "alpha_pattern"):
        bad = pathological_keys(config.get(field), _MAX_PATTERNS)
        if bad:
            (key, why), more = bad[0], f" ({len(bad)} such keys)" if len(bad) > 1 else ""
            yield PATHOLOGICAL.finding(f"{field} key {brief(key)}{more}: {why}", ctx.config_file(field))


def _range_findings(ctx: Context, config: dict) -> Iterator[Finding]:
    r = config.get("r")
    if isinstance(r, float) or isinstance(r, int) and not isinstance(r, bool) and r <= 0:
        yield BAD_VALUE.finding(f"r is {r!r}; a LoRA rank must be a positive integer", ctx.config_file("r"))
    dropout = config.get("lora_dropout")
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and not 0 <= dropout < 1:
        yield BAD_VALUE.finding(f"lora_dropout is {dropout}; torch.nn.Dropout needs 0 <= p < 1",
                                ctx.config_file("lora_dropout"))
    alpha = config.get("lora_alpha")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha == 0:
        yield BAD_VALUE.finding("lora_alpha is 0, which scales every LoRA update to nothing: the adapter is a no-op",
                                ctx.config_file("lora_alpha"), severity=Severity.WARNING,
                                fix=Fix(None, "Set lora_alpha to the value used in training."))


def _json_type(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def newer_value(key: str, value: object, newest: dict) -> bool:
    """Does a later release admit `value` (so it is new, not wrong)? init_lora_weights goes by the values LoRA's
    code acts on, which the annotation lags behind."""
    if key == "init_lora_weights" and isinstance(value, str):
        return any(r.understands_init(value) for r in peft_table().releases)
    spec = newest.get(key)
    return spec is not None and bool(spec.annotation) and fits(value, spec.annotation)
