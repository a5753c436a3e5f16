"""Tests of the PEFT release table generator and of the committed table.

The parser is exercised on small synthetic ``peft`` trees written here; nothing is downloaded.
"""
from __future__ import annotations

import ast
import io
import json
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import load_tool
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
TABLE_PATH = ROOT / "doctor" / "knowledge" / "peft_releases.json"


regen = load_tool("regenerate_peft_table")

ENUMS = """
import enum

class PeftType(str, enum.Enum):
    LORA = "LORA"
    IA3 = "IA3"

class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
"""


def make_tree(files: dict[str, str]) -> regen.SourceTree:
    base = {"peft/__init__.py": "from .utils import PeftType, TaskType\n", "peft/utils/__init__.py":
            "from .peft_types import PeftType, TaskType\n", "peft/utils/peft_types.py": ENUMS}
    return regen.SourceTree({path: textwrap.dedent(text) for path, text in {**base, **files}.items()})


def fields_of(body: str, name: str = "Config", extra: dict[str, str] | None = None) -> dict:
    source = "from dataclasses import dataclass, field\nfrom typing import ClassVar, Optional\n"
    source += "from .utils.peft_types import PeftType, TaskType\n" + textwrap.dedent(body)
    tree = make_tree({"peft/config.py": source, **(extra or {})})
    module, cls = tree.resolve("peft.config", name)
    return regen.dataclass_fields(tree, module, cls)


# --- fields and defaults ------------------------------------------------------------------

def test_plain_annotation_with_literal_default():
    fields = fields_of("""
        @dataclass
        class Config:
            r: int = 8
            dropout: float = 0.0
            name: str = "x"
            flag: bool = False
            nothing: Optional[int] = None
            negative: int = -1
    """)
    assert fields["r"] == {"annotation": "int", "default": 8}
    assert fields["dropout"]["default"] == 0.0
    assert fields["name"]["default"] == "x"
    assert fields["flag"]["default"] is False
    assert fields["nothing"] == {"annotation": "Optional[int]", "default": None}
    assert fields["negative"]["default"] == -1


def test_field_default_and_factories():
    fields = fields_of("""
        @dataclass
        class Config:
            a: int = field(default=4, metadata={"help": "a"})
            b: list = field(default_factory=list)
            c: dict = field(default_factory=dict)
            d: dict = field(default_factory=lambda: {"k": [1, 2]})
            e: object = field(default_factory=lambda: make())
            f: object = field(default_factory=Runtime)
            g: tuple = (1, 2)
            h: set = field(default_factory=lambda: {"b", "a"})
    """)
    assert fields["a"] == {"annotation": "int", "default": 4}
    assert fields["b"]["default"] == []
    assert fields["c"]["default"] == {}
    assert fields["d"]["default"] == {"k": [1, 2]}
    assert fields["e"]["default"] == {"$expr": "make()"}
    assert fields["f"]["default"] == {"$expr": "Runtime()"}
    assert fields["g"]["default"] == [1, 2]
    assert fields["h"]["default"] == ["a", "b"]


def test_required_init_false_classvar_and_private_fields():
    fields = fields_of("""
        @dataclass
        class Config:
            needed: int
            also_needed: str = field(metadata={"help": "no default"})
            hidden: Optional[list] = field(default=None, init=False)
            counter: ClassVar[int] = 0
            _private: int = 3
    """)
    assert fields["needed"] == {"annotation": "int", "required": True}
    assert fields["also_needed"] == {"annotation": "str", "required": True}
    assert fields["hidden"] == {"annotation": "Optional[list]", "default": None, "init": False}
    assert "counter" not in fields and "_private" not in fields


def test_enum_member_default_becomes_its_value_and_other_names_stay_expressions():
    fields = fields_of("""
        CONSTANT = 3

        @dataclass
        class Config:
            peft_type: PeftType = PeftType.LORA
            task_type: Optional[TaskType] = field(default=TaskType.SEQ_CLS)
            other: int = CONSTANT
            computed: float = float("inf")
    """)
    assert fields["peft_type"]["default"] == "LORA"
    assert fields["task_type"]["default"] == "SEQ_CLS"
    assert fields["other"]["default"] == {"$expr": "CONSTANT"}
    assert fields["computed"]["default"] == {"$expr": "float('inf')"}


def test_string_annotation_keeps_its_text():
    fields = fields_of("""
        @dataclass
        class Config:
            runtime: "Optional[Runtime]" = None
    """)
    assert fields["runtime"]["annotation"] == "Optional[Runtime]"


def test_inherited_fields_across_modules_and_overrides():
    extra = {
        "peft/tuners/__init__.py": "from .lora import LoraConfig\n",
        "peft/tuners/lora.py": """
            from dataclasses import dataclass, field
            from ..config import PeftConfig

            @dataclass
            class LoraConfig(PeftConfig):
                r: int = 8
                inference_mode: bool = True
        """,
    }
    source = """
        class PushToHubLike:
            not_a_field: int = 1

        @dataclass
        class PeftConfigMixin(PushToHubLike):
            peft_type: Optional[PeftType] = field(default=None)

        @dataclass
        class PeftConfig(PeftConfigMixin):
            task_type: Optional[str] = None
            inference_mode: bool = False
    """
    tree = make_tree({"peft/config.py": "from dataclasses import dataclass, field\nfrom typing import Optional\n"
                      "from .utils import PeftType\n" + textwrap.dedent(source), **extra})
    module, cls = tree.resolve("peft.tuners", "LoraConfig")
    fields = regen.dataclass_fields(tree, module, cls)
    assert set(fields) == {"peft_type", "task_type", "inference_mode", "r"}
    assert fields["inference_mode"]["default"] is True  # the subclass wins
    assert "not_a_field" not in fields  # annotations of a non-dataclass base are not fields


def test_resolution_follows_imports_not_stale_copies():
    tree = make_tree({
        "peft/__init__.py": "from .config import PeftConfig\n",
        "peft/config.py": "from dataclasses import dataclass\n@dataclass\nclass PeftConfig:\n    fresh: int = 1\n",
        "peft/utils/config.py": "from dataclasses import dataclass\n@dataclass\nclass PeftConfig:\n    stale: int = 1\n",
    })
    module, cls = tree.resolve("peft", "PeftConfig")
    assert module == "peft.config"
    assert set(regen.dataclass_fields(tree, module, cls)) == {"fresh"}


def test_enum_members():
    tree = make_tree({})
    assert tree.enum_members("peft", "PeftType") == {"LORA": "LORA", "IA3": "IA3"}
    assert list(tree.enum_members("peft", "TaskType").values()) == ["CAUSAL_LM", "SEQ_CLS"]
    assert tree.enum_members("peft", "Missing") == {}


# --- PeftType -> config class -------------------------------------------------------------

CONFIGS = """
from dataclasses import dataclass

@dataclass
class LoraConfig:
    r: int = 8

@dataclass
class IA3Config:
    fan_in_fan_out: bool = False
"""


def test_config_mapping_dict_with_string_and_enum_keys():
    tree = make_tree({
        "peft/tuners.py": CONFIGS,
        "peft/mapping.py": """
            from .tuners import IA3Config, LoraConfig
            from .utils import PeftType
            PEFT_TYPE_TO_CONFIG_MAPPING = {"LORA": LoraConfig, PeftType.IA3: IA3Config, "LORAPLUS": LoraConfig}
        """,
    })
    found = regen.config_classes(tree, tree.enum_members("peft", "PeftType"))
    assert {k: v[1].name for k, v in found.items()} == {"LORA": "LoraConfig", "IA3": "IA3Config"}


def test_register_peft_method_calls():
    tree = make_tree({
        "peft/mapping.py": "PEFT_TYPE_TO_CONFIG_MAPPING: dict = {}\n",
        "peft/tuners/lora/__init__.py": """
            from peft.utils import register_peft_method
            from .config import LoraConfig
            register_peft_method(name="lora", config_cls=LoraConfig, model_cls=None)
        """,
        "peft/tuners/lora/config.py": CONFIGS,
        "peft/tuners/ia3/__init__.py": """
            from .config import IA3Config
            if True:
                register_peft_method(
                    name="ia3", model_cls=None, config_cls=IA3Config,
                )
        """,
        "peft/tuners/ia3/config.py": CONFIGS,
    })
    found = regen.config_classes(tree, tree.enum_members("peft", "PeftType"))
    assert found["LORA"] == ("peft.tuners.lora.config", found["LORA"][1])
    assert found["IA3"][1].name == "IA3Config"


# --- loading behaviour --------------------------------------------------------------------

def methods_of(body: str) -> dict:
    module = ast.parse(textwrap.dedent(body))
    return {f.name: ("peft.config", f) for f in ast.walk(module) if isinstance(f, ast.FunctionDef)}


def classify(body: str, extra: dict[str, str] | None = None) -> tuple:
    methods = methods_of(body)
    tree = make_tree({"peft/config.py": textwrap.dedent(body), **(extra or {})})
    plain = {name: func for name, (_, func) in methods.items()}
    return (regen.unknown_key_handling(plain), regen.peft_type_handling(tree, methods),
            regen.validates_task_type(methods))


HASATTR_LOOP = """
class PeftConfigMixin:
    @classmethod
    def from_pretrained(cls, path, **kwargs):
        loaded_attributes = cls.from_json_file(path)
        config = cls(**kwargs)
        for key, value in loaded_attributes.items():
            if hasattr(config, key):
                setattr(config, key, value)
        return config
"""

PLAIN_CALL = """
class PeftConfigMixin:
    @classmethod
    def from_peft_type(cls, **kwargs):
        if "peft_type" in kwargs:
            config_cls = MAPPING[kwargs["peft_type"]]
        else:
            config_cls = cls
        return config_cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        hub_kwargs, class_kwargs, _ = cls._split_kwargs(kwargs)
        loaded_attributes = cls.from_json_file(path)
        kwargs = {**class_kwargs, **loaded_attributes}
        return cls.from_peft_type(**kwargs)

    @classmethod
    def _get_peft_type(cls, path):
        loaded_attributes = cls.from_json_file(path)
        return loaded_attributes["peft_type"]
"""

WARNING_RETRY = """
import warnings
MIN_EXPECTED_CONFIG_KEYS = {"peft_type"}

class PeftConfigMixin:
    def __post_init__(self):
        if (self.task_type is not None) and (self.task_type not in list(TaskType)):
            raise ValueError("bad task type")

    @classmethod
    def from_peft_type(cls, **kwargs):
        config_cls = cls
        try:
            config = config_cls(**kwargs)
        except TypeError as exc:
            filtered, unexpected = _check_and_remove_unused_kwargs(config_cls, kwargs)
            if not MIN_EXPECTED_CONFIG_KEYS.issubset(set(filtered)):
                raise TypeError("missing keys")
            warnings.warn(f"ignored {unexpected}")
            config = config_cls.from_peft_type(**filtered)
        return config

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        loaded_attributes = cls.from_json_file(path)
        kwargs = {**kwargs, **loaded_attributes}
        return cls.from_peft_type(**kwargs)
"""


def test_hasattr_setattr_loop_ignores_unknown_keys():
    assert classify(HASATTR_LOOP)[0] == "ignore"


def test_user_kwargs_splat_with_hasattr_loop_still_ignores():
    # the shape of 0.4/0.5: cls(**class_kwargs) only sees caller kwargs, never the JSON
    body = HASATTR_LOOP.replace("config = cls(**kwargs)", "_, class_kwargs, _ = cls._split_kwargs(kwargs)\n"
                                "        config = MAPPING[loaded_attributes['peft_type']](**class_kwargs)")
    assert classify(body)[0] == "ignore"


def test_plain_construction_raises_and_followed_through_from_peft_type():
    unknown, peft_type, validated = classify(PLAIN_CALL)
    assert unknown == "raise"
    assert peft_type == "keyerror"  # from _get_peft_type; the read in from_peft_type is guarded
    assert validated is False


def test_typeerror_retry_with_warning():
    assert classify(WARNING_RETRY) == ("warn", "typeerror", True)


def test_no_loader_at_all():
    assert classify("class PeftConfig:\n    pass\n") == (None, None, False)


def test_guarded_peft_type_read_is_not_required():
    body = PLAIN_CALL.split("    @classmethod\n    def _get_peft_type")[0]
    assert classify(body)[1] is None


def test_mapping_indexed_by_loaded_peft_type_is_keyerror():
    model = """
        class PeftModel:
            @classmethod
            def from_pretrained(cls, model, model_id):
                config = MAPPING[PeftConfig.from_pretrained(model_id).peft_type].from_pretrained(model_id)
                return cls(model, config)
    """
    assert classify(HASATTR_LOOP, {"peft/peft_model.py": model})[1] == "keyerror"


# --- spans, releases, archives ------------------------------------------------------------

def test_field_spans_gap_and_change():
    a, b = {"annotation": "int", "default": 1}, {"annotation": "bool", "default": True}
    spans = regen.field_spans(["1", "2", "3", "4", "5"], [a, a, None, a, b])
    assert [(s["from"], s["to"], s["default"]) for s in spans] == [("1", "2", 1), ("4", "4", 1), ("5", "5", True)]


def test_build_table_from_two_synthetic_releases():
    old = {"peft/config.py": "from dataclasses import dataclass\n@dataclass\nclass PeftConfig:\n    r: int = 8\n",
           "peft/mapping.py": "from .config import PeftConfig\nPEFT_TYPE_TO_CONFIG_MAPPING = {'LORA': PeftConfig}\n"}
    new = dict(old)
    new["peft/config.py"] += "    use_dora: bool = False\n"
    base = {"peft/__init__.py": "from .utils import PeftType, TaskType\nfrom .config import PeftConfig\n",
            "peft/utils/__init__.py": "from .peft_types import PeftType, TaskType\n",
            "peft/utils/peft_types.py": ENUMS}
    table = regen.build_table([regen.analyse("0.1.0", "2023-01-01", {**base, **old}),
                               regen.analyse("0.2.0", "2023-02-01", {**base, **new})])
    assert [r["version"] for r in table["releases"]] == ["0.1.0", "0.2.0"]
    assert table["configs"]["LORA"] == {"class": "PeftConfig", "fields": {
        "r": [{"from": "0.1.0", "to": "0.2.0", "annotation": "int", "default": 8}],
        "use_dora": [{"from": "0.2.0", "to": "0.2.0", "annotation": "bool", "default": False}],
    }}


def test_list_releases_skips_prereleases_and_prefers_wheels():
    def entry(name, kind, time):
        return {"filename": name, "packagetype": kind, "url": f"../../packages/{name}", "upload_time": time[:19],
                "upload_time_iso_8601": time, "digests": {"sha256": "0" * 64}, "yanked": False}
    index = {"releases": {
        "0.10.0": [entry("peft-0.10.0.tar.gz", "sdist", "2024-03-21T10:00:00Z"),
                   entry("peft-0.10.0-py3-none-any.whl", "bdist_wheel", "2024-03-20T23:59:00Z")],
        "0.9.0": [entry("peft-0.9.0.tar.gz", "sdist", "2024-02-28T10:00:00Z")],
        "0.18.0rc0": [entry("peft-0.18.0rc0.tar.gz", "sdist", "2025-10-01T00:00:00Z")],
        "0.0.0": [],
    }}
    releases = regen.list_releases(index)
    assert [(r.version, r.filename, r.date) for r in releases] == [
        ("0.9.0", "peft-0.9.0.tar.gz", "2024-02-28"),
        ("0.10.0", "peft-0.10.0-py3-none-any.whl", "2024-03-20"),
    ]
    assert releases[1].url == "https://pypi.org/packages/peft-0.10.0-py3-none-any.whl"


def test_read_sources_from_wheel_and_sdist(tmp_path):
    wheel = tmp_path / "peft-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("peft/__init__.py", "x = 1\n")
        zf.writestr("peft-1.0.dist-info/METADATA", "Name: peft\n")
    sdist = tmp_path / "peft-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name in ("peft-1.0/src/peft/config.py", "peft-1.0/tests/test_peft.py", "peft-1.0/setup.py"):
            data = b"y = 2\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert regen.read_sources(wheel) == {"peft/__init__.py": "x = 1\n"}
    assert regen.read_sources(sdist) == {"peft/config.py": "y = 2\n"}


# --- the committed table ------------------------------------------------------------------

@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads(TABLE_PATH.read_text())


def _first(table: dict, peft_type: str, name: str) -> str:
    return table["configs"][peft_type]["fields"][name][0]["from"]


def _release(table: dict, version: str) -> dict:
    return next(r for r in table["releases"] if r["version"] == version)


def test_table_shape_and_canonical_form(table):
    assert table["schema"] == 1
    assert table["source"] == "parsed from the published peft wheels on PyPI"
    versions = [Version(r["version"]) for r in table["releases"]]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert not any(v.is_prerelease or v.is_devrelease for v in versions)
    assert TABLE_PATH.read_text() == json.dumps(table, indent=1, sort_keys=True) + "\n"
    assert TABLE_PATH.stat().st_size < 1_000_000


@pytest.mark.parametrize("name, version", [
    ("r", "0.0.1"), ("init_lora_weights", "0.3.0"), ("revision", "0.4.0"), ("layers_to_transform", "0.4.0"),
    ("layers_pattern", "0.4.0"), ("rank_pattern", "0.6.0"), ("alpha_pattern", "0.6.0"),
    ("loftq_config", "0.7.0"), ("megatron_config", "0.7.0"), ("use_rslora", "0.8.0"), ("use_dora", "0.9.0"),
    ("layer_replication", "0.10.0"), ("runtime_config", "0.12.0"), ("exclude_modules", "0.14.0"),
    ("eva_config", "0.14.0"), ("lora_bias", "0.14.0"), ("trainable_token_indices", "0.15.0"),
    ("corda_config", "0.15.0"), ("use_qalora", "0.16.0"), ("target_parameters", "0.17.0"),
    ("peft_version", "0.18.0"), ("alora_invocation_tokens", "0.18.0"), ("arrow_config", "0.18.0"),
    ("ensure_weight_tying", "0.18.0"), ("lora_ga_config", "0.19.0"), ("use_bdlora", "0.19.0"),
    ("velora_config", "0.20.0"), ("monteclora_config", "0.20.0"),
])
def test_lora_field_first_release(table, name, version):
    assert _first(table, "LORA", name) == version


@pytest.mark.parametrize("name", ["enable_lora", "merge_weights"])
def test_fields_dropped_after_0_2(table, name):
    assert table["configs"]["LORA"]["fields"][name][-1]["to"] == "0.2.0"


def test_lora_defaults(table):
    fields = table["configs"]["LORA"]["fields"]
    assert fields["r"] == [{"from": "0.0.1", "to": table["releases"][-1]["version"], "annotation": "int", "default": 8}]
    assert fields["use_dora"][0]["default"] is False
    assert fields["runtime_config"][0]["default"] == {"$expr": "LoraRuntimeConfig()"}
    assert table["configs"]["LORA"]["class"] == "LoraConfig"


@pytest.mark.parametrize("version, expected", [
    ("0.2.0", "ignore"), ("0.3.0", "ignore"), ("0.4.0", "ignore"), ("0.5.0", "ignore"),
    ("0.6.0", "raise"), ("0.10.0", "raise"), ("0.13.2", "raise"), ("0.14.0", "warn"), ("0.21.2", "warn"),
])
def test_unknown_key_handling(table, version, expected):
    assert _release(table, version)["unknown_keys"] == expected


def test_loading_behaviour_ranges(table):
    for release in table["releases"]:
        modern = Version(release["version"]) >= Version("0.14.0")
        assert release["task_type_validated"] is modern
        if Version(release["version"]) >= Version("0.4.0"):
            assert release["peft_type_required"] == ("typeerror" if modern else "keyerror")


def test_peft_and_task_types(table):
    first = _release(table, "0.3.0")
    assert first["task_types"] == ["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS"]
    assert {"LORA", "ADALORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"} <= set(first["peft_types"])
    every = {t for r in table["releases"] for t in r["peft_types"]}
    assert {"IA3", "LOHA", "LOKR", "OFT", "BOFT", "VERA"} <= every
    assert every == set(table["configs"])
    for release in table["releases"]:
        assert "LORA" in release["peft_types"]


# --- modules_to_save matching and init_lora_weights values ----------------------------------------------

SUFFIX_RULE = """
def _set_trainable(model, adapter_name, module_names):
    for key in [k for k, _ in model.named_modules()]:
        if any(key.endswith(target_key) for target_key in module_names):
            pass
"""
SUBSTRING_RULE = """
def _set_trainable(model):
    for name, param in model.named_parameters():
        if any(module_name in name for module_name in model.modules_to_save):
            param.requires_grad = True
"""


@pytest.mark.parametrize("source, rule", [(SUFFIX_RULE, "suffix"), (SUBSTRING_RULE, "substring"), ("x = 1\n", None)])
def test_modules_to_save_rule(source, rule):
    assert regen.modules_to_save_match(make_tree({"peft/utils/other.py": source})) == rule


def test_lora_init_values_from_the_layer_code():
    layer = """
    class LoraLayer:
        def update_layer(self, adapter_name, init_lora_weights):
            if isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa"):
                pass
            elif init_lora_weights == "lora_ga":
                pass
            elif init_lora_weights.lower() == "olora":
                pass
        def reset_lora_parameters(self, adapter_name, init_lora_weights):
            if init_lora_weights is True:
                pass
            else:
                raise ValueError(f"Unknown initialization {init_lora_weights=}")
    """
    tree = make_tree({"peft/tuners/lora/__init__.py": "", "peft/tuners/lora/layer.py": layer})
    assert regen.lora_init_values(tree) == {"equals": ["lora_ga", "olora"], "prefixes": ["pissa"], "other_strings": "raise"}


def test_committed_table_has_the_matching_rules():
    table = json.loads(TABLE_PATH.read_text())
    by_version = {r["version"]: r for r in table["releases"]}
    assert by_version["0.2.0"]["modules_to_save_match"] == "substring"
    assert all(r["modules_to_save_match"] == "suffix" for r in table["releases"] if Version(r["version"]) >= Version("0.3.0"))
    assert "lora_ga" in by_version["0.19.0"]["lora_init_values"]["equals"]
    assert "lora_ga" not in by_version["0.18.1"]["lora_init_values"]["equals"]
