import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch

from adapter_doctor.pickle_scan import is_dangerous, scan


def _malicious_global() -> bytes:
    # os.system("echo pwned") via GLOBAL + REDUCE; built from opcodes, never loaded.
    return b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03."


def _malicious_stack_global() -> bytes:
    # The module and name strings come from the memo, as picklescan-evasion attempts do.
    return (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"
            b"\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x041+1\x94\x85\x94R\x94.")


def test_torch_zip_state_dict_passes_and_yields_the_tensor_index(tmp_path):
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
    assert result.error or result.globals is not None
    if "os.system" in result.globals:
        assert not result.passed and "os.system" in result.dangerous
