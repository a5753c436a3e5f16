"""Files built to break the doctor: each becomes ordinary findings, never an exception out of
diagnose(), an internal-error finding, a signal, a hang or a memory blow-up. Every case runs in a
child process, which also renders the report with rich to a UTF-8 stream."""
import json
import shutil
import struct
import zipfile

import pytest
from conftest import DATA
from hostile import View, assert_contained, member_span, run_isolated, torch_zip

HEALTHY = DATA / "real-adapters" / "000-0112LY__logo-gemma-lora__adapter"
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture
def adapter(tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(HEALTHY, target)
    return target


def _header(adapter, raw: bytes, data: bytes = b""):
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _bin(adapter, views: dict, storages=None, **kwargs):
    (adapter / "adapter_model.safetensors").unlink()
    return torch_zip(adapter / "adapter_model.bin", views, storages, **kwargs)


def _config(adapter, **changes):
    (adapter / "adapter_config.json").write_text(json.dumps({**LORA, **changes}))


# --- parsers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, words", [
    (b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}", "nested too deeply"),
    (b'{"a":{"dtype":"F32","shape":[' + b"1" * 4301 + b'],"data_offsets":[0,4]}}', "4,300 digits"),
    (b'{"a":{"dtype":[],"shape":[1],"data_offsets":[0,4]}}', "unknown dtype an array"),
    (b'{"base_model.model.q\\ud800.lora_A.weight":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', "surrogate"),
])
def test_bad_safetensors_headers_are_one_line_corrupt_findings(adapter, raw, words):
    _header(adapter, raw)
    outcome = run_isolated(adapter)
    assert_contained(outcome)
    (message,) = outcome.messages("ADC411")
    assert words in message and "adapter_model.safetensors" in message and "\n" not in message


def test_huge_integers_in_the_config(adapter):
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "1" * 4301 + "}")
    outcome = run_isolated(adapter)
    assert_contained(outcome)
    assert any("4,300 digits" in m for m in outcome.messages("ADC102"))
    _config(adapter, peft_version="1" * 4400, r=10**4000)
    assert_contained(run_isolated(adapter))


@pytest.mark.parametrize("config", [{"target_modules": ["q\udc80"]}, {"peft_type": "LORA\ud800"},
                                    {"base_model_name_or_path": "/x\udcff/y"}])
def test_lone_surrogates_in_config_strings_render(adapter, config):
    (adapter / "adapter_config.json").write_text(json.dumps({**LORA, **config}))
    outcome = run_isolated(adapter)
    assert_contained(outcome)
    assert any("\udc80" in f["message"] for f in outcome.findings) or "target_modules" not in config


@pytest.mark.parametrize("name", ["a" * 256, "org/" + "a" * 300, "/" + "d/" * 3000, "./x\x00y", "a" * 100_000])
def test_base_model_names_the_os_cannot_look_up(adapter, name):
    _config(adapter, base_model_name_or_path=name)
    outcome = run_isolated(adapter)
    assert_contained(outcome)
    assert any(i.startswith("ADC30") for i in outcome.ids)  # reported as a base that is not here


def test_a_base_whose_config_claims_a_billion_layers(adapter, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 10**9,
                                                  "hidden_size": 64, "intermediate_size": 128,
                                                  "num_attention_heads": 4, "vocab_size": 100}))
    _config(adapter, base_model_name_or_path=str(base))
    assert_contained(run_isolated(adapter))


def test_a_model_card_of_blank_lines(adapter):
    (adapter / "README.md").write_text("---\n" + "\n" * (1 << 20))
    assert_contained(run_isolated(adapter), seconds=3)


# --- pickle walker -----------------------------------------------------------------------------------

def _legacy_bin(adapter, numel: int):
    torch = pytest.importorskip("torch", reason="writing a legacy-format torch file needs torch")

    (adapter / "adapter_model.safetensors").unlink()
    path = adapter / "adapter_model.bin"
    torch.save({"base_model.model.q_proj.lora_A.weight": torch.ones(3, 2)}, path, _use_new_zipfile_serialization=False)
    raw = bytearray(path.read_bytes())
    raw[-32:-24] = struct.pack("<q", numel)
    path.write_bytes(bytes(raw))


def test_legacy_file_claiming_2_to_the_61_elements(adapter):
    _legacy_bin(adapter, 2**61)
    outcome = run_isolated(adapter)
    assert_contained(outcome)
    assert "ADC412" in outcome.ids


@pytest.mark.parametrize("damage", ["deflate", "missing", "lzma", "short"])
def test_damaged_storage_members_are_corrupt_findings(adapter, damage):
    views = {"base_model.model.q_proj.lora_A.weight": View((4, 8)), "base_model.model.q_proj.lora_B.weight": View((8, 4), key="1")}
    if damage == "missing":
        _bin(adapter, views, {"0": bytes(128)})
    elif damage == "short":
        _bin(adapter, views, {"0": bytes(128), "1": bytes(100)})
    elif damage == "lzma":
        _bin(adapter, views, compression=zipfile.ZIP_LZMA)
    else:
        path = _bin(adapter, views, {"0": bytes(range(128)), "1": bytes(range(128))}, compression=zipfile.ZIP_DEFLATED)
        raw = path.read_bytes()
        start, end = member_span(raw, "archive/data/1")
        path.write_bytes(raw[:start] + b"\xff" * (end - start) + raw[end:])
    outcome = run_isolated(adapter)
    assert_contained(outcome)
    assert "ADC412" in outcome.ids
    assert all("adapter_model.bin" in m for m in outcome.messages("ADC412"))


@pytest.mark.parametrize("raw", [
    b"\x80\x02}N" + b"\x85" * 10**6 + b"Ns.",  # SIGSEGV: a key a million tuples deep
    b"\x80\x02(]]K\x01d.",
    b"\x80\x02}\x8b" + struct.pack("<i", 4000) + b"\x01" * 4000 + b"Ns.",
    b"PK\x03\x04" + b"\x00" * 100,
    b"\x80\x02" + b"]" * 2_100_000 + b".",  # past the opcode limit
])
def test_hostile_pickles_are_contained(adapter, raw):
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(raw)
    outcome = run_isolated(adapter)
    assert_contained(outcome)
    assert outcome.ids & {"ADC412", "ADC421", "ADC422"}


# --- the values check --------------------------------------------------------------------------------

def test_a_20000_by_20000_view_of_four_elements(adapter):
    _bin(adapter, {"base_model.model.q_proj.lora_B.weight": View((20000, 20000), (0, 0), numel=4)}, {"0": bytes(16)})
    outcome = run_isolated(adapter)
    assert_contained(outcome, seconds=3, peak=300 << 20)
    assert "ADC703" in outcome.ids  # and it is read right: the four zeros are all there is


def test_a_zip_member_that_inflates_a_thousandfold(adapter):
    size = 320 << 20  # past the 256 MiB the scan may inflate from a small file
    (adapter / "adapter_model.safetensors").unlink()
    path = torch_zip(adapter / "adapter_model.bin", {"base_model.model.q_proj.lora_B.weight": View((size // 4,))}, {})
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as member:
            block = bytes(16 << 20)
            for _ in range(size // len(block)):
                member.write(block)
    assert path.stat().st_size < 2 << 20
    outcome = run_isolated(adapter)
    assert_contained(outcome, peak=300 << 20)
    assert any("expand" in m for m in outcome.messages("ADC412"))


# --- regular expressions -------------------------------------------------------------------------------

def test_a_catastrophic_target_modules_regex(adapter):
    name = "base_model.model." + "a" * 40
    _header(adapter, json.dumps({f"{name}.lora_A.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                                 f"{name}.lora_B.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode())
    _config(adapter, target_modules="(a*)*b", exclude_modules="(x+x+)+y")
    outcome = run_isolated(adapter)
    assert_contained(outcome, seconds=3)
    messages = outcome.messages("ADC109")
    assert any("'(a*)*b'" in m and "exponential" in m for m in messages) and any("(x+x+)+y" in m for m in messages)
    assert "ADC512" not in outcome.ids  # unknown, so not claimed


def test_catastrophic_and_numerous_rank_pattern_keys(adapter):
    rank_pattern = {f"layers.{i}.q_proj": 8 for i in range(20_000)} | {"(a|a)*x": 4, ".*a.*a.*a.*a.*a.*b": 2}
    _config(adapter, rank_pattern=rank_pattern)
    outcome = run_isolated(adapter)
    assert_contained(outcome, seconds=5)
    (message,) = outcome.messages("ADC109")
    assert "rank_pattern key '(a|a)*x' (2 such keys)" in message


# --- scale ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b'"a":{},' * 14_000_000,  # 100 MB of `{}`
    b'"a":{},' * 500_000,  # fewer objects than the tensor limit: parsed, then refused
    b'"a":[' + b"[]," * 33_000_000 + b"[]],",
    b'"a":{"dtype":"U8","data_offsets":[0,0],"shape":[' + b"1," * 49_000_000 + b'1]},',
])
def test_a_100_mb_header_of_empty_values(adapter, body):
    _header(adapter, b"{" + body + b'"z":{}}')
    outcome = run_isolated(adapter)
    (adapter / "adapter_model.safetensors").unlink()  # pytest keeps the last runs' folders
    assert_contained(outcome, peak=400 << 20)
    assert "ADC411" in outcome.ids


def test_a_million_target_modules(adapter):
    _config(adapter, target_modules=[f"module_{i}" for i in range(1_000_000)])
    outcome = run_isolated(adapter)
    assert_contained(outcome, seconds=5, peak=600 << 20)
    assert all(len(f["message"]) < 2000 for f in outcome.findings)


def test_a_hundred_thousand_tensors(adapter):
    header, offset = {}, 0
    for i in range(50_000):
        for role, shape in (("lora_A", [4, 8]), ("lora_B", [8, 4])):
            name = f"base_model.model.model.layers.{i // 8}.mlp.experts.{i % 8}.q_proj.{role}.weight"
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + 64]}
            offset += 64
    _header(adapter, json.dumps(header).encode(), b"\x01" * offset)
    outcome = run_isolated(adapter)
    assert_contained(outcome, seconds=5, peak=600 << 20)
    assert all(len(f["message"]) < 2000 for f in outcome.findings)
