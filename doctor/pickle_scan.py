"""Read torch pickles (`.bin`, `.pt`) without unpickling them.

A small symbolic machine walks the opcodes from `pickletools.genops`. Nothing is imported or
called: a GLOBAL becomes a `GlobalRef`, a REDUCE of an allow-listed torch rebuild function becomes
a `PickledTensor` record, and anything else becomes an opaque value. That yields the imported
globals (for the safety verdict) and, for ordinary state dicts, the tensor index (names, dtypes,
shapes, storage locations) that the key, shape and value checks need.
"""
from __future__ import annotations

import math
import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
}
_REBUILD_TENSOR = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2"}
_REBUILD_PARAMETER = {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}
_TORCH_DTYPES = {"float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
ALLOWED_GLOBALS = frozenset(
    {"collections.OrderedDict", "torch.Size"}
    | _REBUILD_TENSOR
    | _REBUILD_PARAMETER
    | {f"torch.{name}" for name in STORAGE_DTYPES}
    | {f"torch.{name}" for name in _TORCH_DTYPES}
)
# Globals that run code or touch the system when unpickled; anything else outside the allow-list is
# still refused, but these mean the file was built to do harm.
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "socket", "runpy", "pty", "pickle", "_pickle", "shutil",
    "asyncio", "webbrowser", "ctypes", "importlib", "code", "pdb", "bdb", "timeit", "multiprocessing",
    "urllib", "http", "requests", "pip", "pydoc", "marshal", "types", "posixpath", "ntpath",
}
_DANGEROUS_NAMES = {
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.open", "builtins.__import__",
    "builtins.getattr", "builtins.setattr", "builtins.breakpoint", "builtins.apply", "builtins.input",
    "__builtin__.eval", "__builtin__.exec", "operator.attrgetter", "operator.itemgetter",
    "operator.methodcaller", "functools.partial", "torch.serialization.load", "torch.load",
}
_MAX_OPS = 5_000_000  # state-dict pickles have a few ops per tensor; this only stops runaway input
_MAX_PICKLE = 1 << 30


@dataclass(frozen=True)
class GlobalRef:
    module: str
    name: str

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Storage:
    key: str
    dtype: str | None
    numel: int | None


@dataclass(frozen=True)
class PickledTensor:
    dtype: str | None
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage: Storage
    offset: int  # in elements

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def contiguous(self) -> bool:
        expected, step = [], 1
        for d in reversed(self.shape):
            expected.append(step)
            step *= d
        return tuple(reversed(expected)) == self.stride or self.numel <= 1


class _Opaque:
    """A value the scan does not model (the result of a call it will not make)."""


_MARK = object()


@dataclass
class PickleScan:
    format: str  # "zip", "legacy" (torch's pre-1.6 format) or "pickle"
    globals: list[str] = field(default_factory=list)
    tensors: dict[str, PickledTensor] | None = None
    other_entries: list[str] = field(default_factory=list)  # non-tensor values in the state dict
    error: str | None = None
    archive_prefix: str | None = None  # zip: where `data/<key>` lives
    storage_offsets: dict[str, int] = field(default_factory=dict)  # legacy: file offset of each storage

    @property
    def unsafe(self) -> list[str]:
        return [g for g in self.globals if g not in ALLOWED_GLOBALS]

    @property
    def dangerous(self) -> list[str]:
        return [g for g in self.unsafe if is_dangerous(g)]

    @property
    def passed(self) -> bool:
        return self.error is None and not self.unsafe


def is_dangerous(dotted: str) -> bool:
    module = dotted.rsplit(".", 1)[0]
    return dotted in _DANGEROUS_NAMES or module.split(".")[0] in _DANGEROUS_MODULES or dotted.startswith("?")


class _Machine:
    def __init__(self, scan: PickleScan) -> None:
        self.scan = scan
        self.stack: list[object] = []
        self.memo: dict[int, object] = {}

    def run(self, stream: io.BufferedIOBase) -> object:
        import pickletools  # imported here: checking safetensors-only adapters should not pay for it

        ops = 0
        for op, arg, _pos in pickletools.genops(stream):
            ops += 1
            if ops > _MAX_OPS:
                raise ValueError("pickle has too many opcodes")
            if op.name == "STOP":
                return self.stack.pop() if self.stack else None
            self.step(op.name, arg)
        raise ValueError("pickle ended without STOP")

    def pop_mark(self) -> list[object]:
        items: list[object] = []
        while True:
            top = self.stack.pop()
            if top is _MARK:
                return items[::-1]
            items.append(top)

    def add_global(self, module: object, name: object) -> GlobalRef:
        ref = GlobalRef(module, name) if isinstance(module, str) and isinstance(name, str) else GlobalRef("?", "computed")
        if ref.dotted not in self.scan.globals:
            self.scan.globals.append(ref.dotted)
        return ref

    def step(self, name: str, arg: object) -> None:  # noqa: C901 - one branch per opcode family
        s = self.stack
        if name in ("PROTO", "FRAME"):
            return
        if name == "MARK":
            s.append(_MARK)
        elif name in ("EMPTY_DICT",):
            s.append({})
        elif name in ("EMPTY_LIST",):
            s.append([])
        elif name in ("EMPTY_TUPLE",):
            s.append(())
        elif name in ("EMPTY_SET",):
            s.append(_Opaque())
        elif name == "NONE":
            s.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            s.append(name == "NEWTRUE")
        elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
                      "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                      "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
            s.append(arg)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = s[-n:]
            del s[-n:]
            s.append(tuple(items))
        elif name == "TUPLE":
            s.append(tuple(self.pop_mark()))
        elif name == "LIST":
            s.append(self.pop_mark())
        elif name == "DICT":
            items = self.pop_mark()
            s.append(dict(zip(items[::2], items[1::2])))
        elif name in ("FROZENSET",):
            self.pop_mark()
            s.append(_Opaque())
        elif name == "APPEND":
            value = s.pop()
            if isinstance(s[-1], list):
                s[-1].append(value)
        elif name in ("APPENDS", "ADDITEMS"):
            items = self.pop_mark()
            if isinstance(s[-1], list):
                s[-1].extend(items)
        elif name == "SETITEM":
            value, key = s.pop(), s.pop()
            self._setitem(s[-1], key, value)
        elif name == "SETITEMS":
            items = self.pop_mark()
            for key, value in zip(items[::2], items[1::2]):
                self._setitem(s[-1], key, value)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[int(arg)] = s[-1]
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = s[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            s.append(self.memo[int(arg)])
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            s.append(self.add_global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = s.pop(), s.pop()
            s.append(self.add_global(module, attr))
        elif name == "INST":
            module, _, attr = str(arg).partition(" ")
            self.add_global(module, attr)
            self.pop_mark()
            s.append(_Opaque())
        elif name == "OBJ":
            items = self.pop_mark()
            if items and not isinstance(items[0], GlobalRef):
                self.add_global(None, None)
            s.append(_Opaque())
        elif name in ("EXT1", "EXT2", "EXT4"):
            # The copyreg extension registry resolves to a global the file does not name.
            s.append(self.add_global(None, None))
        elif name in ("PERSID", "BINPERSID"):
            pid = arg if name == "PERSID" else s.pop()
            s.append(_storage(pid))
        elif name == "REDUCE":
            args, func = s.pop(), s.pop()
            s.append(_reduce(func, args))
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            if name == "NEWOBJ_EX":
                s.pop()
            s.pop()
            s.pop()
            s.append(_Opaque())
        elif name == "BUILD":
            s.pop()
        elif name == "POP":
            s.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            s.append(s[-1])
        elif name in ("NEXT_BUFFER", "READONLY_BUFFER"):
            s.append(_Opaque())
        else:
            raise ValueError(f"unsupported pickle opcode {name}")

    @staticmethod
    def _setitem(target: object, key: object, value: object) -> None:
        if isinstance(target, dict):
            try:
                target[key] = value
            except TypeError:  # unhashable symbolic key
                pass


def _storage(pid: object) -> object:
    if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[2], str):
        cls = pid[1]
        dtype = STORAGE_DTYPES.get(cls.name) if isinstance(cls, GlobalRef) and cls.module == "torch" else None
        numel = pid[4] if isinstance(pid[4], int) else None
        return Storage(pid[2], dtype, numel)
    return _Opaque()


def _reduce(func: object, args: object) -> object:
    if not isinstance(func, GlobalRef) or not isinstance(args, tuple):
        return _Opaque()
    dotted = func.dotted
    if dotted == "collections.OrderedDict" and args == ():
        return {}
    if dotted == "torch.Size" and len(args) == 1 and isinstance(args[0], tuple):
        return args[0]
    if dotted in _REBUILD_TENSOR and len(args) >= 4 and isinstance(args[0], Storage):
        storage, offset, shape, stride = args[:4]
        if isinstance(offset, int) and _int_tuple(shape) and _int_tuple(stride):
            return PickledTensor(storage.dtype, shape, stride, storage, offset)
    if dotted in _REBUILD_PARAMETER and args and isinstance(args[0], PickledTensor):
        return args[0]
    return _Opaque()


def _int_tuple(x: object) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) and not isinstance(d, bool) for d in x)


def _collect_tensors(scan: PickleScan, obj: object) -> None:
    if not isinstance(obj, dict):
        return
    scan.tensors = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, PickledTensor):
            scan.tensors[key] = value
        else:
            scan.other_entries.append(str(key))


def scan(path: Path) -> PickleScan:
    """Scan a torch zip archive, a legacy torch file or a plain pickle. Never raises on bad input."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"PK\x03\x04":
            return _scan_zip(path)
        return _scan_stream(path)
    except OSError as exc:
        return PickleScan("pickle", error=f"unreadable: {exc.strerror or exc}")


def _scan_zip(path: Path) -> PickleScan:
    import zipfile

    result = PickleScan("zip")
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if len(pkls) != 1:
                result.error = f"zip archive holds {len(pkls)} data.pkl entries (a torch archive has one)"
                return result
            result.archive_prefix = pkls[0][: -len("data.pkl")]
            if zf.getinfo(pkls[0]).file_size > _MAX_PICKLE:
                result.error = f"data.pkl unpacks to {zf.getinfo(pkls[0]).file_size:,} bytes (a state dict's is small)"
                return result
            payload = zf.read(pkls[0])
    except (zipfile.BadZipFile, ValueError, RuntimeError, NotImplementedError, EOFError) as exc:
        # A torch archive cut short loses its central directory, which sits at the end.
        result.error = f"damaged or truncated zip archive ({exc})"
        return result
    _run_one(result, io.BytesIO(payload), collect=True)
    return result


def _scan_stream(path: Path) -> PickleScan:
    result = PickleScan("pickle")
    with open(path, "rb") as fh:
        size = fh.seek(0, io.SEEK_END)
        fh.seek(0)
        if size == 0:
            result.error = "the file is empty"
            return result
        objects: list[object] = []
        while fh.tell() < size and result.error is None and len(objects) < 5:
            objects.append(_run_one(result, fh, collect=False))
        if result.error is None and _is_legacy_torch(objects):
            result.format = "legacy"
            _collect_tensors(result, objects[3])
            _legacy_storage_layout(result, fh, objects[4], size)
        elif result.error is None and fh.tell() < size and len(objects) < 5:
            result.error = "bytes after the last pickle"
        elif result.error is None:
            while fh.tell() < size and result.error is None:  # a file of several plain pickles
                objects.append(_run_one(result, fh, collect=False))
            if objects:
                _collect_tensors(result, objects[0])
    return result


class _Bounded:
    """A reader that never asks for more than the stream holds: a pickle may claim a 2**63-byte string."""

    def __init__(self, stream: io.BufferedIOBase, size: int) -> None:
        self.stream, self.size = stream, size

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.stream.tell()
        return self.stream.read(left if n < 0 or n > left else n)

    def readline(self) -> bytes:
        return self.stream.readline(max(0, self.size - self.stream.tell()))

    def tell(self) -> int:
        return self.stream.tell()


def _run_one(result: PickleScan, stream: io.BufferedIOBase, collect: bool) -> object:
    here = stream.tell()
    size = stream.seek(0, io.SEEK_END)
    stream.seek(here)
    try:
        obj = _Machine(result).run(_Bounded(stream, size))
    except (ValueError, IndexError, KeyError, EOFError, struct.error, UnicodeDecodeError, MemoryError) as exc:
        result.error = f"malformed pickle: {exc}"
        return None
    if collect:
        _collect_tensors(result, obj)
    return obj


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _is_legacy_torch(objects: list[object]) -> bool:
    return len(objects) == 5 and objects[0] == _LEGACY_MAGIC and isinstance(objects[4], list)


def _legacy_storage_layout(result: PickleScan, fh: io.BufferedIOBase, keys: list[object], size: int) -> None:
    # After the pickles come the storages in `keys` order, each as an int64 element count and raw bytes.
    storages = {t.storage.key: t.storage for t in (result.tensors or {}).values()}
    for key in keys:
        header = fh.read(8)
        if len(header) < 8:
            result.error = "file ends before all storages are stored (truncated)"
            return
        (numel,) = struct.unpack("<q", header)
        result.storage_offsets[str(key)] = fh.tell()
        storage = storages.get(str(key))
        width = element_size(storage.dtype) if storage and storage.dtype else None
        if width is None or numel < 0:
            result.error = f"cannot size storage {key!r}"
            return
        fh.seek(numel * width, io.SEEK_CUR)
    if fh.tell() != size:
        result.error = "file size does not match its storages (truncated or trailing bytes)"


def element_size(dtype: str) -> int | None:
    return {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "C64": 8}.get(dtype)
