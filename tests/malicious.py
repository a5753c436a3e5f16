"""A corpus of malicious adapter weights, built opcode by opcode (no torch, nothing committed).

Every sample carries a sentinel side effect: it creates the file named by `$MAL_SENTINEL` (a shell
command or Python code run by the payload), or, for TorchScript, prints its own token from a
`__setstate__`. `tests/doctor/test_malicious_pickles.py` loads each one in a child process the way
an unsafe loader would and counts it live only if the side effect happened.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CMD = 'touch "$MAL_SENTINEL"'
PY = 'open(__import__("os").environ["MAL_SENTINEL"], "w").close()'
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    loader: str  # "pickle": pickle.load; "torch": torch.load(weights_only=False)
    token: str | None = None  # TorchScript samples print this instead of touching the sentinel


# --- opcodes -----------------------------------------------------------------------------------------

def g(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def short(text: str) -> bytes:  # SHORT_BINUNICODE (protocol 4)
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def raw_bytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def call(func: bytes, *args: bytes) -> bytes:
    return func + b"(" + b"".join(args) + b"tR"


def lst(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def p2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def p4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


SH = lst(u("sh"), u("-c"), u(CMD))
IMPORT_OS = call(g("builtins", "__import__"), u("os"))
OS_SYSTEM = p2(call(g("os", "system"), u(CMD)))


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _dumped(protocol: int) -> bytes:
    import os

    return pickle.dumps(_Reduce(os.system, (CMD,)), protocol=protocol)


# --- torch archives ----------------------------------------------------------------------------------

def state_dict(extra: bytes = b"") -> bytes:
    """A state-dict data.pkl as torch.save writes it (one float tensor "w" of 2 elements), after `extra` entries."""
    pid = b"(" + u("storage") + g("torch", "FloatStorage") + u("0") + u("cpu") + b"K\x02t"
    tensor = call(g("torch._utils", "_rebuild_tensor_v2"), pid + b"QK\x00" + b"K\x02\x85" + b"K\x01\x85" + b"\x89"
                  + g("collections", "OrderedDict") + b")R")
    return p2(b"}(" + extra + u("w") + tensor + b"u")  # the extra entries first: they run before any storage


CLEAN = state_dict()
EVIL_SD = state_dict(u("x") + call(g("os", "system"), u(CMD)))
EVIL_DICT = p2(b"}(" + u("x") + call(g("os", "system"), u(CMD)) + b"u")  # no storages: loads without torch


def archive_members(data_pkl: bytes, prefix: str = "archive/") -> list[tuple[str, bytes]]:
    return [(prefix + "data.pkl", data_pkl), (prefix + "byteorder", b"little"), (prefix + "data/0", bytes(8)),
            (prefix + "version", b"3\n"), (prefix + ".data/serialization_id", b"0" * 40)]


def zip_of(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED, stream: bool = False) -> bytes:
    buf = io.BytesIO()
    target = _Unseekable(buf) if stream else buf  # an unseekable target makes zipfile write data descriptors
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point of some samples
        with zipfile.ZipFile(target, "w", compression) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return buf.getvalue()


class _Unseekable(io.RawIOBase):
    def __init__(self, buf: io.BytesIO) -> None:
        self.buf = buf

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.buf.write(b)

    def flush(self) -> None:
        pass


def rename_local_header(archive: bytes, old: str, new: str) -> bytes:
    """Change one member's name in its local header only (same length): the central directory keeps `old`."""
    assert len(old) == len(new)
    at = 0
    while True:
        n, m = struct.unpack_from("<HH", archive, at + 26)
        if archive[at + 30:at + 30 + n] == old.encode():
            return archive[:at + 30] + new.encode() + archive[at + 30 + n:]
        (size,) = struct.unpack_from("<I", archive, at + 18)
        at = archive.index(b"PK\x03\x04", at + 30 + n + m + size)


_JIT_CLASS = ('class Evil:\n  x : int\n  def __getstate__(self: __torch__.Evil) -> int:\n    return self.x\n'
              '  def __setstate__(self: __torch__.Evil,\n    s: int) -> NoneType:\n    print("{token}")\n'
              '    self.x = s\n    return None\n')
_JIT_MODULE = ('class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n  training : bool\n'
               '  e : __torch__.Evil\n  def forward(self: __torch__.M,\n    x: Tensor) -> Tensor:\n    return x\n')
_EVIL_OBJ = g("__torch__", "Evil") + b")\x81K\x03b"


def torchscript_constants(token: str) -> bytes:
    """A clean state-dict data.pkl; constants.pkl holds a TorchScript object whose __setstate__ runs on load."""
    return zip_of([("archive/data.pkl", CLEAN), ("archive/code/__torch__.py", _JIT_CLASS.format(token=token).encode()),
                   ("archive/constants.pkl", p2(b"(" + _EVIL_OBJ + b"t")), ("archive/version", b"3\n"),
                   ("archive/byteorder", b"little"), ("archive/data/0", bytes(8))])


def torchscript_module(token: str) -> bytes:
    """A scripted module whose attribute `e` runs __setstate__ on load (data.pkl is the module)."""
    module = p2(g("__torch__", "M") + b")\x81}(" + u("training") + b"\x88" + u("_is_full_backward_hook") + b"N"
                + u("e") + _EVIL_OBJ + b"ub")
    code = (_JIT_MODULE + _JIT_CLASS.format(token=token)).encode()
    return zip_of([("archive/data.pkl", module), ("archive/code/__torch__.py", code),
                   ("archive/constants.pkl", p2(b")")), ("archive/version", b"3\n"), ("archive/byteorder", b"little")])


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def legacy(*pickles: bytes) -> bytes:
    return b"".join(pickles)


MAGIC = pickle.dumps(_LEGACY_MAGIC, protocol=2)
PROTOCOL = pickle.dumps(1001, protocol=2)
SYS_INFO = pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)


# --- the corpus ----------------------------------------------------------------------------------------

def _plain() -> dict[str, bytes]:
    partial = call(g("functools", "partial"), g("os", "system"), u(CMD))
    getattr_os_system = call(g("builtins", "getattr"), IMPORT_OS, u("system"))
    add = lambda a, b: call(g("operator", "add"), u(a), u(b))  # noqa: E731
    return {
        "p2_os_system": OS_SYSTEM,
        "p2_posix_system": p2(call(g("posix", "system"), u(CMD))),
        "p2_os_popen": p2(call(g("os", "popen"), u(CMD))),
        "p2_builtins_exec": p2(call(g("builtins", "exec"), u(PY))),
        "p2_builtins_eval": p2(call(g("builtins", "eval"), u(PY))),
        "p2_py2_builtin_exec": p2(call(g("__builtin__", "exec"), u(PY))),
        "p2_exec_compile": p2(call(g("builtins", "exec"), call(g("builtins", "compile"), u(PY), u("<x>"), u("exec")))),
        "p2_getattr_import_os": p2(call(getattr_os_system, u(CMD))),
        "p2_getattr_importlib": p2(call(call(g("builtins", "getattr"), call(g("importlib", "import_module"), u("os")),
                                             u("system")), u(CMD))),
        "p2_getattr_builtins_exec": p2(call(call(g("builtins", "getattr"), call(g("builtins", "__import__"),
                                                 u("builtins")), u("exec")), u(PY))),
        "p2_subprocess_call": p2(call(g("subprocess", "call"), SH)),
        "p2_subprocess_popen": p2(call(g("subprocess", "Popen"), SH) + b"0" + call(g("time", "sleep"), b"G?\xe0\x00\x00\x00\x00\x00\x00")),
        "p2_subprocess_check_output": p2(call(g("subprocess", "check_output"), SH)),
        "p2_copyreg_reconstructor": p2(call(g("copyreg", "_reconstructor"), g("subprocess", "Popen"),
                                            g("subprocess", "Popen"), SH) + b"0" + call(g("time", "sleep"), b"G?\xe0\x00\x00\x00\x00\x00\x00")),
        "p2_functools_partial": p2(partial + b")R"),
        "p2_functools_reduce_exec": p2(call(g("functools", "reduce"), g("builtins", "exec"), lst(u(PY), b"}"))),
        "p2_operator_methodcaller": p2(call(call(g("operator", "methodcaller"), u("system"), u(CMD)), IMPORT_OS)),
        "p2_operator_attrgetter": p2(call(call(call(g("operator", "attrgetter"), u("system")), IMPORT_OS), u(CMD))),
        "p2_operator_call": p2(call(g("operator", "call"), g("os", "system"), u(CMD))),
        "p2_runpy_run_code": p2(call(g("runpy", "_run_code"), u(PY), b"}")),
        "p2_timeit": p2(call(g("timeit", "timeit"), u(PY), u("pass"), g("time", "perf_counter"), b"K\x01")),
        "p2_memo_reuse": p2(g("os", "system") + b"q\x07" + b"0" + b"h\x07" + b"(" + u(CMD) + b"tR"),
        "p2_in_state_dict": EVIL_SD,
        "nested_pickle_loads": p2(call(g("pickle", "loads"), raw_bytes(OS_SYSTEM))),
        "nested__pickle_loads": p2(call(g("_pickle", "loads"), raw_bytes(OS_SYSTEM))),
        "nested_getattr_pickle_loads": p2(call(call(g("builtins", "getattr"), call(g("builtins", "__import__"),
                                                    u("pickle")), u("loads")), raw_bytes(EVIL_DICT))),
        "p0_os_system": f"cos\nsystem\n(S'{CMD}'\ntR.".encode(),
        "p0_posix_system": f"cposix\nsystem\n(S'{CMD}'\ntR.".encode(),
        "p0_inst_os_system": f"(S'{CMD}'\nios\nsystem\n.".encode(),
        "p0_builtin_exec": f"c__builtin__\nexec\n(S'{PY}'\ntR.".encode(),
        "p0_builtin_eval": f"c__builtin__\neval\n(S'{PY}'\ntR.".encode(),
        "p0_inst_subprocess_call": f"((S'sh'\nS'-c'\nS'{CMD}'\nlisubprocess\ncall\n.".encode(),
        "p0_getattr_chain": (f"c__builtin__\ngetattr\n(c__builtin__\n__import__\n(S'os'\ntRS'system'\ntR"
                             f"(S'{CMD}'\ntR.").encode(),
        "p1_obj_os_system": f"(cos\nsystem\nS'{CMD}'\no.".encode(),
        "p1_obj_builtins_exec": b"(" + g("builtins", "exec") + u(PY) + b"o.",
        "p4_stack_global": p4(short("os") + short("system") + b"\x93" + u(CMD) + b"\x85R"),
        "p4_stack_global_memo": p4(short("os") + b"\x94" + short("system") + b"\x94" + b"00" + b"h\x00h\x01\x93"
                                   + u(CMD) + b"\x85R"),
        "p4_stack_global_built": p4(add("o", "s") + b"\x94" + add("sys", "tem") + b"\x94" + b"00" + b"h\x00h\x01\x93"
                                    + u(CMD) + b"\x85R"),
        "p4_stack_global_join": p4(call(call(g("builtins", "getattr"), u(""), u("join")), lst(u("o"), u("s"))) + b"\x94"
                                   + b"0" + b"h\x00" + short("system") + b"\x93" + u(CMD) + b"\x85R"),
        "p4_newobj_partial": p4(g("functools", "partial") + g("os", "system") + u(CMD) + b"\x86\x81" + b")R"),
        "p4_newobj_ex_partial": p4(g("functools", "partial") + g("os", "system") + u(CMD) + b"\x86}\x92" + b")R"),
        "p2_past_opcode_bound": p2(b"N0" * 1_000_001 + call(g("os", "system"), u(CMD))),
        "p3_pickle_dumps": _dumped(3),
        "p5_pickle_dumps": _dumped(5),
    }


def _torch() -> dict[str, bytes]:
    base = archive_members(CLEAN)
    rest = [m for m in base if not m[0].endswith("data.pkl")]
    return {
        "zip_state_dict_os_system": zip_of(archive_members(EVIL_SD)),
        "zip_deflated": zip_of(archive_members(EVIL_SD), zipfile.ZIP_DEFLATED),
        "zip_protocol4": zip_of(archive_members(p4(short("x") + short("os") + short("system") + b"\x93" + u(CMD)
                                                    + b"\x85R" + b"\x86" + b"\x85"))),
        "zip_nested_pickle_loads": zip_of(archive_members(p2(call(g("pickle", "loads"), raw_bytes(EVIL_DICT))))),
        "zip_data_descriptor": zip_of(archive_members(EVIL_SD), zipfile.ZIP_DEFLATED, stream=True),
        "zip_local_name_mismatch": rename_local_header(zip_of(archive_members(EVIL_SD)), "archive/data.pkl",
                                                       "archive/dat4.pkl"),
        "zip_case_Data_beside_xdata": zip_of([("archive/Data.pkl", EVIL_SD)] + rest + [("archive/xdata.pkl", CLEAN)]),
        "zip_case_collision": zip_of(base + [("archive/DATA.pkl", EVIL_SD)]),
        "zip_duplicate_name": zip_of(base + [("archive/data.pkl", EVIL_SD)]),
        # torch reads `archive/DATA.PKL`; a scanner keyed on names ending in data.pkl finds archive/x/data.pkl
        "zip_nested_prefix": zip_of([("archive/DATA.PKL", EVIL_SD)] + rest + archive_members(CLEAN, "archive/x/")),
        "zip_other_prefix": zip_of(archive_members(EVIL_SD, "evil/")),
        "zip_torchscript_constants": torchscript_constants("MALSENTINEL-zip_torchscript_constants"),
        "zip_torchscript_module": torchscript_module("MALSENTINEL-zip_torchscript_module"),
        "tar_storages": tar_of([("storages", OS_SYSTEM), ("tensors", b"\x80\x02K\x00."), ("pickle", CLEAN)]),
        "tar_tensors": tar_of([("storages", b"\x80\x02K\x00.\x80\x02]."), ("tensors", OS_SYSTEM), ("pickle", CLEAN)]),
        "legacy_after_magic": legacy(MAGIC, OS_SYSTEM),
        "legacy_sys_info": legacy(MAGIC, PROTOCOL, OS_SYSTEM),
        "legacy_main_pickle": legacy(MAGIC, PROTOCOL, SYS_INFO, EVIL_DICT, pickle.dumps([], protocol=2)),
        "legacy_storage_keys": legacy(MAGIC, PROTOCOL, SYS_INFO, p2(b"}"), OS_SYSTEM),
    }


def samples() -> list[Sample]:
    out = [Sample(n, d, "pickle") for n, d in _plain().items()]
    for name, data in _torch().items():
        out.append(Sample(name, data, "torch", f"MALSENTINEL-{name}" if "torchscript" in name else None))
    return out


def write_corpus(root: Path) -> dict[str, Path]:
    """One adapter folder per sample (adapter_config.json + adapter_model.bin); returns name -> folder."""
    out = {}
    for s in samples():
        folder = root / s.name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
        (folder / "adapter_model.bin").write_bytes(s.data)
        out[s.name] = folder
    return out
