import pickle
import zipfile
from collections import OrderedDict

import pytest
from adapter_doctor.pickle_scan import ALLOWED_GLOBALS, is_dangerous, scan


def _torch():
    # The scanner needs no torch; only the tests that make real torch files do.
    return pytest.importorskip("torch", reason="making a real torch file needs torch")


def _malicious_global() -> bytes:
    # os.system("echo pwned") via GLOBAL + REDUCE; built from opcodes, never loaded.
    return b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03."


def _malicious_stack_global() -> bytes:
    # The module and name strings come from the memo, as picklescan-evasion attempts do.
    return (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"
            b"\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x041+1\x94\x85\x94R\x94.")


def test_torch_zip_state_dict_passes_and_yields_the_tensor_index(tmp_path):
    torch = _torch()
    path = tmp_path / "adapter_model.bin"
    base = torch.arange(12, dtype=torch.float32)
    torch.save(OrderedDict(a=torch.zeros(2, 3, dtype=torch.bfloat16), view=base[2:6], t=base.reshape(3, 4).t(),
                           p=torch.nn.Parameter(torch.ones(4))), path)
    result = scan(path)
    assert result.format == "zip" and result.passed and result.error is None
    assert set(result.globals) <= {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                                   "torch._utils._rebuild_parameter", "torch.BFloat16Storage", "torch.FloatStorage"}
    shapes = {n: (t.dtype, t.shape, t.offset, t.contiguous) for n, t in result.tensors.items()}
    assert shapes == {"a": ("BF16", (2, 3), 0, True), "view": ("F32", (4,), 2, True),
                      "t": ("F32", (4, 3), 0, False), "p": ("F32", (4,), 0, True)}
    assert result.tensors["view"].storage.key == result.tensors["t"].storage.key  # shared storage is visible


def test_legacy_torch_format(tmp_path):
    torch = _torch()
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(3, 2)}, path, _use_new_zipfile_serialization=False)
    result = scan(path)
    assert result.format == "legacy" and result.passed
    assert result.tensors["w"].shape == (3, 2)
    key = result.tensors["w"].storage.key
    assert path.read_bytes()[result.storage_offsets[key]:][:24] == torch.ones(6).numpy().tobytes()


@pytest.mark.parametrize("payload, name", [(_malicious_global(), "os.system"), (_malicious_stack_global(), "builtins.eval")])
def test_code_execution_globals_are_dangerous(tmp_path, payload, name):
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(payload)
    result = scan(path)
    assert not result.passed and result.dangerous == [name]


def test_malicious_pickle_inside_a_torch_zip(tmp_path):
    path = tmp_path / "adapter_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _malicious_global())
        zf.writestr("archive/version", "3\n")
    assert scan(path).dangerous == ["os.system"]


def test_unknown_but_not_known_dangerous_globals_still_fail(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps({"when": __import__("datetime").date(2024, 1, 1)}, protocol=2))
    result = scan(path)
    assert "datetime.date" in result.unsafe and result.dangerous == [] and not result.passed


def test_computed_global_names_count_as_dangerous(tmp_path):
    # STACK_GLOBAL whose operands are not plain strings cannot be resolved statically.
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x80\x04K\x01K\x02\x93.")
    result = scan(path)
    assert result.dangerous and result.dangerous[0].startswith("?")


HUGE_CLAIM = b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"abc"  # BINBYTES8 claiming 4 EiB


@pytest.mark.parametrize("raw", [b"", b"\x80\x02}q\x00(X\x01\x00", b"PK\x03\x04garbage", b"\x80\x02K\x01K\x02K\x03", HUGE_CLAIM])
def test_damaged_input_reports_an_error_and_never_raises(tmp_path, raw):
    path = tmp_path / "x.bin"
    path.write_bytes(raw)
    result = scan(path)
    assert result.error and not result.passed


def test_danger_classification():
    assert is_dangerous("subprocess.Popen") and is_dangerous("posix.system") and is_dangerous("builtins.exec")
    assert not is_dangerous("datetime.date") and not is_dangerous("numpy.core.multiarray._reconstruct")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OPCODE_SNIPPETS = [
    b"\x80\x02", b"(", b"}", b"]", b")", b"t", b"\x85", b"\x86", b"\x87", b"l", b"d", b"u", b"s", b"a", b"e", b"R",
    b"b", b"Q", b"P1\n", b"q\x00", b"h\x00", b"r\x00\x00\x00\x00", b"j\x00\x00\x00\x00", b"\x94", b"0", b"1", b"2",
    b"N", b"\x88", b"\x89", b"K\x05", b"M\x00\x01", b"J\x00\x00\x00\x80", b"\x8a\x01\xff", b"X\x01\x00\x00\x00a",
    b"\x8c\x03abc", b"ctorch\nFloatStorage\n", b"ccollections\nOrderedDict\n", b"cos\nsystem\n", b"\x93",
    b"ctorch._utils\n_rebuild_tensor_v2\n", b"\x81", b"\x92", b"o", b"i__main__\nX\n", b"\x82\x01", b"G" + b"\0" * 8,
    b"C\x02ab", b"\x8f", b"\x90", b"\x91", b".",
]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(OPCODE_SNIPPETS), max_size=40))
def test_random_opcode_streams_never_raise(tmp_path_factory, parts):
    path = tmp_path_factory.mktemp("p") / "x.bin"
    path.write_bytes(b"".join(parts))
    result = scan(path)
    # passed only when it parsed and imported nothing but torch's rebuild functions and storages
    if result.passed:
        assert result.error is None and set(result.globals) <= set(ALLOWED_GLOBALS)
    else:
        assert result.error or result.unsafe or result.refused
    if "os.system" in result.globals:
        assert not result.passed and "os.system" in result.dangerous


# --- hostile pickles and archives: an error (or a verdict), never an exception ----------------------

import io  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from hostile import View, member_span, torch_pickle, torch_zip  # noqa: E402


def _legacy_with_numel(tmp_path, numel: int):
    torch = _torch()
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(3, 2)}, path, _use_new_zipfile_serialization=False)
    raw = bytearray(path.read_bytes())
    raw[-32:-24] = struct.pack("<q", numel)  # the one storage's element count, before its 24 bytes
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("numel", [2**61, 2**62 - 1, -1, 7, 5])
def test_legacy_storage_counts_that_do_not_fit_the_file(tmp_path, numel):
    result = scan(_legacy_with_numel(tmp_path, numel))
    assert result.error and not result.passed


@pytest.mark.parametrize("body", [
    b"(]]K\x01d.",  # DICT with a list as key
    b"}(]K\x01]K\x02u.",  # SETITEMS with unhashable keys
    b"}\x8b" + struct.pack("<i", 4000) + b"\x01" * 4000 + b"Ns.",  # a 32,000-bit integer key
    b"}" + b"N" + b"\x85" * 5000 + b"Ns.",  # a key 5,000 tuples deep
    b"}(" + b"N" + b"\x85" * 5000 + b"\x85Nu.",
])
def test_keys_that_cannot_be_hashed_or_printed(tmp_path, body):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x80\x02" + body)
    result = scan(path)
    assert result.passed and result.tensors == {} and result.other_entries
    assert all(len(entry) < 100 for entry in result.other_entries)


def test_a_million_nested_tuples_do_not_crash_the_interpreter(tmp_path):
    # Hashing a key a million tuples deep overflows the C stack: SIGSEGV, no output at all.
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(b"\x80\x02}N" + b"\x85" * 10**6 + b"Ns.")
    code = "import sys; from adapter_doctor.pickle_scan import scan; r = scan(sys.argv[1]); print(r.passed, r.error)"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-500:]


def test_views_outside_their_storage_are_damage(tmp_path):
    for i, view in enumerate([View((2,), (1,), offset=5, numel=6), View((3, 3), (3, 1), numel=8),
                              View((2,), (-1,), offset=1, numel=2), View((2,), (1, 1), numel=2),
                              View((2,), (1,), offset=-1, numel=4)]):
        path = torch_zip(tmp_path / f"v{i}.bin", {"w": view}, {"0": bytes(4 * view.numel)})
        result = scan(path)
        assert result.error and "tensor 'w'" in result.error, (view, result.error)


def test_a_stride_zero_view_of_four_elements_is_fine(tmp_path):
    path = torch_zip(tmp_path / "x.bin", {"w": View((20000, 20000), (0, 0), numel=4)}, {"0": bytes(16)})
    result = scan(path)
    assert result.passed and result.tensors["w"].shape == (20000, 20000)


def test_missing_short_or_torch_unreadable_storage_members(tmp_path):
    views = {"w": View((2, 3))}
    assert "missing" in scan(torch_zip(tmp_path / "a.bin", views, {"1": bytes(24)})).error
    assert "holds 20 bytes" in scan(torch_zip(tmp_path / "b.bin", views, {"0": bytes(20)})).error
    lzma = scan(torch_zip(tmp_path / "c.bin", views, compression=zipfile.ZIP_LZMA)).error
    assert "compression method 14" in lzma


def _corrupt(raw: bytes, member: str, fill: int) -> bytes:
    start, end = member_span(raw, member)
    return raw[:start + 2] + bytes([fill]) * (end - start - 2) + raw[end:]


@pytest.mark.parametrize("damage", ["deflate", "crc", "no-central-directory", "lying-size", "utf8-name"])
def test_damaged_data_pkl_members(tmp_path, damage):
    path = torch_zip(tmp_path / "x.bin", {"w": View((2, 3))}, compression=zipfile.ZIP_DEFLATED)
    raw = path.read_bytes()
    if damage == "deflate":
        raw = _corrupt(raw, "archive/data.pkl", 0xFF)
    elif damage == "crc":
        start, _ = member_span(raw, "archive/data.pkl")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:  # same bytes, stored, then one flipped
            zf.writestr("archive/data.pkl", torch_pickle({"w": View((2, 3))}))
        raw = bytearray(buf.getvalue())
        raw[member_span(bytes(raw), "archive/data.pkl")[0] + 3] ^= 0x01
        raw = bytes(raw)
    elif damage == "no-central-directory":
        raw = raw[:raw.rfind(b"PK\x01\x02")]
    elif damage == "lying-size":  # the central directory's uncompressed size, 2 GiB from a few bytes
        at = raw.find(b"PK\x01\x02")  # data.pkl's entry comes first
        raw = raw[:at + 24] + struct.pack("<I", 2**31) + raw[at + 28:]
    elif damage == "utf8-name":
        raw = raw.replace(b"archive/version", b"archive/\xff\xfeersion")
        raw = raw.replace(struct.pack("<H", 0), struct.pack("<H", 0x800), 0)
    path.write_bytes(raw)
    result = scan(path)
    assert not result.passed and result.error


def test_oversized_pickles_are_refused_without_reading_them(tmp_path):
    path = tmp_path / "x.bin"
    with open(path, "wb") as fh:  # a 70 MiB BINBYTES8 followed by STOP
        fh.write(b"\x80\x04\x8e" + (70 << 20).to_bytes(8, "little"))
        fh.truncate(11 + (70 << 20))
        fh.seek(0, 2)
        fh.write(b".")
    result = scan(path)
    assert result.error and "64 MiB" in result.error
