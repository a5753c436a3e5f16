"""Read torch pickles (`.bin`, `.pt`) without unpickling them.

A small symbolic machine walks the opcodes from `pickletools.genops`. Nothing is imported or
called: a GLOBAL becomes a `GlobalRef`, a REDUCE of an allow-listed torch rebuild function becomes
a `PickledTensor` record, and anything else becomes an opaque value. That yields the imported
globals (for the safety verdict) and, for ordinary state dicts, the tensor index (names, dtypes,
shapes, storage locations) that the key, shape and value checks need.

Files come from strangers: the walk is bounded in opcodes and bytes, builds no value it would have
to hash or print whole, and the index is held against the archive (every view inside its storage,
every storage member present, of the size the pickle says, in a form torch's reader can read).
"""
from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, cast

from .gc_paused import gc_paused
from .safetensors_header import element_bytes

if TYPE_CHECKING:
    import zipfile

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
_MAX_OPS = 2_000_000  # ~30 ops per tensor: 65,000 tensors; it bounds the walk to a few seconds
_MAX_PICKLE = 64 << 20  # tensor data lives outside the pickle; a 100k-tensor state dict's is ~15 MB
_MAX_MEMBERS = 1 << 19  # zip entries: one per storage, and storages are at most one per tensor


class BoundReached(ValueError):
    """The walk reached one of its bounds: the rest of the pickle is unchecked, not known to be damaged."""


@lru_cache(maxsize=1)
def zip_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged zip archive raises (zipfile is imported only for archives)."""
    import zipfile
    import zlib

    return (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
            NotImplementedError, KeyError, struct.error, UnicodeDecodeError, OverflowError)


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
    format: str  # "zip", "legacy" (torch's pre-1.6 format), "tar" (older still) or "pickle"
    globals: list[str] = field(default_factory=list)
    tensors: dict[str, PickledTensor] | None = None
    other_entries: list[str] = field(default_factory=list)  # non-tensor values in the state dict
    error: str | None = None
    archive_prefix: str | None = None  # zip: where `data/<key>` lives
    byteorder: str = "little"  # zip: the `byteorder` record (torch reads an archive without one as little-endian)
    storage_offsets: dict[str, int] = field(default_factory=dict)  # legacy: file offset of each storage
    refused: str | None = None  # why torch could load code or bytes other than those scanned
    unverified: bool = False  # the walk stopped at one of its bounds (refused, and also beyond what is read)

    @property
    def unsafe(self) -> list[str]:
        return [g for g in self.globals if g not in ALLOWED_GLOBALS]

    @property
    def dangerous(self) -> list[str]:
        return [g for g in self.unsafe if is_dangerous(g)]

    @property
    def passed(self) -> bool:
        return self.error is None and not self.unsafe and self.refused is None


def is_dangerous(dotted: str) -> bool:
    module = dotted.rsplit(".", 1)[0]
    return dotted in _DANGEROUS_NAMES or module.split(".")[0] in _DANGEROUS_MODULES or dotted.startswith("?")


class _OtherKey:
    """A dict key that is not a string. It is never hashed or compared by value: a pickle can build a
    key a million tuples deep, and hashing that overflows the C stack."""

    __slots__ = ("text",)

    def __init__(self, key: object) -> None:
        self.text = describe(key)


def describe(value: object) -> str:
    """A short, safe description of a symbolic value (never its repr, which may recurse or be huge)."""
    if isinstance(value, str):
        return value if len(value) <= 80 else value[:77] + "..."
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() <= 64:
        return str(value)
    if isinstance(value, _OtherKey):
        return value.text
    return f"<{type(value).__name__}>"


class _Machine:
    def __init__(self, scan: PickleScan) -> None:
        self.scan = scan
        self.stack: list[object] = []
        self.memo: dict[int, object] = {}
        self.handlers = self._handlers()

    def run(self, stream: io.BytesIO) -> object:
        import pickletools  # imported here: checking safetensors-only adapters should not pay for it

        handlers = self.handlers
        for ops, (op, arg, _pos) in enumerate(pickletools.genops(stream), 1):
            if ops > _MAX_OPS:
                raise BoundReached(f"pickle has more than {_MAX_OPS:,} opcodes")
            if op.name == "STOP":
                return self.stack.pop() if self.stack else None
            handler = handlers.get(op.name)
            if handler is None:
                raise ValueError(f"unsupported pickle opcode {op.name}")
            handler(arg)
        raise ValueError("pickle ended without STOP")

    def _handlers(self) -> dict[str, Callable[[object], object]]:
        # One entry per opcode: a dict lookup per op instead of a chain of comparisons.
        s, push = self.stack, self.stack.append
        out: dict[str, Callable[[object], object]] = {
            "PROTO": _ignore, "FRAME": _ignore,
            "MARK": lambda _: push(_MARK),
            "EMPTY_DICT": lambda _: push({}),
            "EMPTY_LIST": lambda _: push([]),
            "EMPTY_TUPLE": lambda _: push(()),
            "EMPTY_SET": lambda _: push(_Opaque()),
            "NONE": lambda _: push(None),
            "NEWTRUE": lambda _: push(True),
            "NEWFALSE": lambda _: push(False),
            "TUPLE1": lambda _: self.tuple_of(1), "TUPLE2": lambda _: self.tuple_of(2),
            "TUPLE3": lambda _: self.tuple_of(3),
            "TUPLE": lambda _: push(tuple(self.pop_mark())),
            "LIST": lambda _: push(self.pop_mark()),
            "DICT": lambda _: push(self.dict_of(self.pop_mark())),
            "FROZENSET": lambda _: (self.pop_mark(), push(_Opaque())),
            "APPEND": self.append, "APPENDS": self.extend, "ADDITEMS": self.extend,
            "SETITEM": self.setitem, "SETITEMS": self.setitems,
            "PUT": self.put, "BINPUT": self.put, "LONG_BINPUT": self.put,
            "MEMOIZE": lambda _: self.memo.__setitem__(len(self.memo), s[-1]),
            "GET": self.get, "BINGET": self.get, "LONG_BINGET": self.get,
            "GLOBAL": lambda arg: push(self.add_global(*_split_global(arg))),
            "STACK_GLOBAL": self.stack_global,
            "INST": self.inst, "OBJ": self.obj,
            "PERSID": lambda arg: push(_storage(arg)),
            "BINPERSID": lambda _: push(_storage(s.pop())),
            "REDUCE": self.reduce,
            "NEWOBJ": lambda _: self.replace_top(2), "NEWOBJ_EX": lambda _: self.replace_top(3),
            "BUILD": lambda _: s.pop(), "POP": lambda _: s.pop(),
            "POP_MARK": lambda _: self.pop_mark(),
            "DUP": lambda _: push(s[-1]),
            "NEXT_BUFFER": lambda _: push(_Opaque()), "READONLY_BUFFER": lambda _: push(_Opaque()),
        }
        for name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING",
                     "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
                     "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
            out[name] = push
        for name in ("EXT1", "EXT2", "EXT4"):
            # The copyreg extension registry resolves to a global the file does not name.
            out[name] = lambda _: push(self.add_global(None, None))
        return out

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

    def tuple_of(self, n: int) -> None:
        items = self.stack[-n:]
        del self.stack[-n:]
        self.stack.append(tuple(items))

    def dict_of(self, items: list[object]) -> dict:
        out: dict = {}
        for key, value in zip(items[::2], items[1::2]):
            _setitem(out, key, value)
        return out

    def append(self, _: object) -> None:
        value = self.stack.pop()
        if isinstance(self.stack[-1], list):
            self.stack[-1].append(value)

    def extend(self, _: object) -> None:
        items = self.pop_mark()
        if isinstance(self.stack[-1], list):
            self.stack[-1].extend(items)

    def setitem(self, _: object) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        _setitem(self.stack[-1], key, value)

    def setitems(self, _: object) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        for key, value in zip(items[::2], items[1::2]):
            _setitem(target, key, value)

    def put(self, arg: object) -> None:
        self.memo[cast(int, arg)] = self.stack[-1]  # pickletools decodes memo indices as ints

    def get(self, arg: object) -> None:
        self.stack.append(self.memo[cast(int, arg)])

    def stack_global(self, _: object) -> None:
        attr, module = self.stack.pop(), self.stack.pop()
        self.stack.append(self.add_global(module, attr))

    def inst(self, arg: object) -> None:
        self.add_global(*_split_global(arg))
        self.pop_mark()
        self.stack.append(_Opaque())

    def obj(self, _: object) -> None:
        items = self.pop_mark()
        if items and not isinstance(items[0], GlobalRef):
            self.add_global(None, None)
        self.stack.append(_Opaque())

    def reduce(self, _: object) -> None:
        args, func = self.stack.pop(), self.stack.pop()
        self.stack.append(_reduce(func, args))

    def replace_top(self, n: int) -> None:
        if len(self.stack) < n:
            raise IndexError("pop from empty stack")
        del self.stack[-n:]
        self.stack.append(_Opaque())


def _ignore(_: object) -> None:
    return None


def _split_global(arg: object) -> tuple[str, str]:
    module, _, attr = str(arg).partition(" ")
    return module, attr


def _setitem(target: object, key: object, value: object) -> None:
    if isinstance(target, dict):
        target[key if type(key) is str else _OtherKey(key)] = value


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
        if type(key) is str and isinstance(value, PickledTensor):
            scan.tensors[key] = value
        else:
            scan.other_entries.append(describe(key))


def scan(path: Path) -> PickleScan:
    """Scan a torch zip archive, a legacy torch file or a plain pickle. Never raises on bad input."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"PK\x03\x04":
            return _scan_zip(path)
        return _scan_tar(path) or _scan_stream(path)
    except OSError as exc:
        return PickleScan("pickle", error=f"unreadable: {exc.strerror or exc}")


def _scan_zip(path: Path) -> PickleScan:
    import zipfile

    result = PickleScan("zip")
    try:
        with open(path, "rb") as fh:  # before zipfile builds an object per entry
            entries = zip_entry_count(fh)
            if entries > _MAX_MEMBERS:
                result.error = f"zip archive lists {entries:,} entries (a torch archive has one per storage)"
                return result
            with zipfile.ZipFile(fh) as zf:
                _scan_archive(result, zf, fh)
    except zip_errors() as exc:
        # A torch archive cut short loses its central directory, which sits at the end.
        result.error = f"damaged or truncated zip archive ({type(exc).__name__}: {exc})"
    return result


# Records only TorchScript writes: torch.load hands such an archive to torch.jit.load, which compiles and runs
# the code in it (a class's __setstate__ runs while constants.pkl is read).
_TORCHSCRIPT_RECORDS = (b"constants.pkl", b"bytecode.pkl", b".data/version")


def _scan_archive(result: PickleScan, zf: zipfile.ZipFile, fh: io.BufferedIOBase) -> None:
    # torch's reader (miniz) takes the record prefix from the first entry, finds records through the central
    # directory ignoring ASCII case, and reads data where the central directory points. Where another reader
    # could see other bytes under the same name, the archive is refused rather than guessed at.
    infos = zf.infolist()
    if not infos:
        result.error = "zip archive holds no members"
        return
    names = [_raw_name(i) for i in infos]
    first = names[0]
    if b"/" not in first:
        result.error = f"first member {describe(first.decode('latin-1'))!r} is not in a folder (torch refuses it)"
        return
    prefix = first[: first.index(b"/") + 1]
    result.archive_prefix = infos[0].filename.split("/", 1)[0] + "/"
    result.refused = _ambiguity(infos, names, prefix, fh)
    records = {n[len(prefix):].lower(): i for n, i in zip(names, infos) if n.startswith(prefix)}
    script = sorted(r.decode("latin-1") for r in records if r.startswith(b"code/") or r in _TORCHSCRIPT_RECORDS)
    pickles = [r for r in records if r.endswith(b".pkl")]
    for info, name in zip(infos, names):  # every pickle torch could unpickle, whatever it is named
        if name.lower().endswith(b".pkl") and info is not records.get(b"data.pkl"):
            _walk_member(result, info, fh, collect=False)
    if script:
        result.refused = result.refused or (f"a TorchScript archive ({', '.join(script[:3])}): torch.load hands it to "
                                            "torch.jit.load, which runs the code it holds")
    elif len(pickles) > 1:
        extra = sorted(p.decode("latin-1") for p in pickles if p != b"data.pkl")
        result.refused = result.refused or f"pickles besides data.pkl ({', '.join(extra[:3])}); torch.save writes one"
    if b"data.pkl" not in records:
        if result.refused is None:
            result.error = "zip archive holds no data.pkl (a torch archive has one)"
        return
    unreadable = next((i for i in infos if _member_problem(i)), None)
    if unreadable is not None:
        result.error = f"member {unreadable.filename}: {_member_problem(unreadable)}"
        return
    _walk_member(result, records[b"data.pkl"], fh, collect=True)
    if result.error is None and b"byteorder" in records:
        result.error = _byteorder(result, records[b"byteorder"], fh)
    if result.error is None and result.tensors and result.passed:
        result.error = _views_problem(result.tensors) or _zip_storage_problem(result, zf)


def _byteorder(result: PickleScan, info: zipfile.ZipInfo, fh: io.BufferedIOBase) -> str | None:
    # torch.load byte-swaps every storage of a "big" archive and raises on any other value than these two.
    try:
        value = _read_member(info, fh, limit=16)
    except zip_errors() as exc:
        return f"member {info.filename}: {exc}"
    if value not in (b"little", b"big"):
        return f"the byteorder record says {describe(value.decode('latin-1'))!r} (torch reads only little or big)"
    result.byteorder = value.decode()
    return None


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    # The bytes miniz compares (zipfile decodes them and cuts them at a NUL).
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "surrogateescape")


def _ambiguity(infos: list, names: list[bytes], prefix: bytes, fh: io.BufferedIOBase) -> str | None:
    other = next((n for n in names if not n.startswith(prefix)), None)
    if other is not None:
        return (f"members under more than one top folder ({_show(prefix)}, {_show(other)}); torch reads "
                f"{_show(prefix)} only")
    if any(b"\x00" in n for n in names):
        return "a member name holds a NUL byte, which readers cut in different places"
    seen: dict[bytes, bytes] = {}
    for name in names:
        twin = seen.setdefault(name.lower(), name)
        if twin is not name:
            how = "twice" if twin == name else f"as {_show(twin)} and {_show(name)}"
            return (f"member {_show(name)} is listed {how}; torch's lookup, which ignores case, may read either, "
                    "so the one scanned is not known to be the one loaded")
    for info, name in zip(infos, names):
        local = _local_name(info, fh)
        if local != name:
            return (f"member {_show(name)} is named {_show(local or b'')} in its local header; torch reads the "
                    "central directory's entry, other readers the local one")
    return None


def _show(name: bytes) -> str:
    return repr(describe(name.decode("utf-8", "replace")))


def _local_name(info: zipfile.ZipInfo, fh: io.BufferedIOBase) -> bytes | None:
    fh.seek(info.header_offset)
    head = fh.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return None
    (n,) = struct.unpack_from("<H", head, 26)
    return fh.read(n)


def _read_member(info: zipfile.ZipInfo, fh: io.BufferedIOBase, limit: int = _MAX_PICKLE) -> bytes:
    """A member's bytes read as miniz reads them: at the central directory's offset and sizes, CRC checked."""
    import zipfile
    import zlib

    if info.file_size > limit or info.compress_size > limit + (1 << 20):
        raise BoundReached(f"{info.filename} unpacks to {info.file_size:,} bytes (a state dict's pickle is small)")
    fh.seek(info.header_offset)
    head = fh.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    n, m = struct.unpack_from("<HH", head, 26)
    fh.seek(info.header_offset + 30 + n + m)
    raw = fh.read(info.compress_size)
    if info.compress_type == zipfile.ZIP_DEFLATED:
        raw = zlib.decompressobj(-15).decompress(raw, info.file_size)
    elif info.compress_type != zipfile.ZIP_STORED:
        raise NotImplementedError(f"compression method {info.compress_type}")
    if len(raw) != info.file_size or zlib.crc32(raw) != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC or size in {info.filename}")
    return raw


def _walk_member(result: PickleScan, info: zipfile.ZipInfo, fh: io.BufferedIOBase, collect: bool) -> None:
    try:
        data = _read_member(info, fh)
    except zip_errors() as exc:
        if collect:
            result.error = f"member {info.filename}: {exc}"
        if isinstance(exc, BoundReached):
            result.refused = result.refused or _unverified(result, str(exc))
        return
    if collect:
        _run_one(result, io.BytesIO(data), collect=True)
    else:
        _walk_all(result, data)


def _walk_all(result: PickleScan, data: bytes) -> None:
    """Record the globals of every pickle in `data`, one after another; their damage is not the file's."""
    side = PickleScan(result.format, globals=result.globals)  # shares the list of globals
    stream = io.BytesIO(data)
    while stream.tell() < len(data) and side.error is None:
        _run_one(side, stream, collect=False)


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    # torch reads archives with miniz: stored or deflated members only, never encrypted ones.
    import zipfile

    if info.flag_bits & 0x1:
        return "encrypted, which torch cannot read"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return f"compression method {info.compress_type}, which torch cannot read (stored or deflated only)"
    limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else 1032 * info.compress_size + 64
    if info.file_size > limit:  # deflate expands at most 1032:1; the header lies
        return f"declares {info.file_size:,} bytes from {info.compress_size:,} compressed"
    return None


def zip_entry_count(fh: io.BufferedIOBase) -> int:
    """The entry count from the end-of-central-directory record (zip64 included), 0 if none is found."""
    size = fh.seek(0, io.SEEK_END)
    tail_size = min(size, 22 + 0xFFFF)
    fh.seek(size - tail_size)
    tail = fh.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return 0
    (count,) = struct.unpack_from("<H", tail, at + 10)
    locator = at - 20
    if count == 0xFFFF and locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
        (record,) = struct.unpack_from("<Q", tail, locator + 8)
        if record + 56 <= size:
            fh.seek(record)
            head = fh.read(56)
            if head[:4] == b"PK\x06\x06":
                (count,) = struct.unpack_from("<Q", head, 32)
    return count


def _views_problem(tensors: dict[str, PickledTensor]) -> str | None:
    """Why torch would refuse to rebuild one of the tensors (a view outside its storage and the like)."""
    for name, t in tensors.items():
        problem = view_problem(t)
        if problem:
            return f"tensor {describe(name)!r} {problem}"
    return None


def view_problem(t: PickledTensor) -> str | None:
    numel = t.storage.numel
    width = element_bytes(t.storage.dtype or "")
    if width is None or numel is None or not 0 <= numel < 1 << 60:
        return "has a storage of unknown type or size"
    if len(t.shape) != len(t.stride) or len(t.shape) > 64:
        return f"has {len(t.shape)} sizes and {len(t.stride)} strides (torch needs as many, at most 64)"
    if t.offset < 0 or min(t.shape, default=0) < 0 or min(t.stride, default=0) < 0:
        return "has a negative size, stride or offset"
    if 0 in t.shape:
        return None
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
    if last >= numel:
        return f"reads element {last:,} of a {numel:,}-element storage"
    return None


def read_storage(result: PickleScan, zf: zipfile.ZipFile, fh: io.BufferedIOBase, key: str) -> bytes:
    """The bytes of storage `key` of a scanned zip archive, read where torch's reader reads them (CRC checked).

    Raises what `zip_errors()` lists. The scan has checked that the member exists with the size its
    element count needs, so the bytes returned are exactly the storage torch would rebuild."""
    info = zf.getinfo(f"{result.archive_prefix}data/{key}")
    return _read_member(info, fh, limit=info.file_size)


def _zip_storage_problem(result: PickleScan, zf: zipfile.ZipFile) -> str | None:
    storages = {t.storage.key: t.storage for t in (result.tensors or {}).values()}
    for key, storage in storages.items():
        member = f"{result.archive_prefix}data/{key}"
        try:
            info = zf.getinfo(member)
        except KeyError:
            return f"storage {describe(key)!r} is missing from the archive (no {describe(member)})"
        want = (storage.numel or 0) * (element_bytes(storage.dtype or "") or 0)  # both known: the views were checked
        if info.file_size != want:
            return f"storage {describe(key)!r} holds {info.file_size:,} bytes; its {storage.numel:,} elements need {want:,}"
    return None


_TAR_PICKLES = ("storages", "tensors", "pickle")


def _scan_tar(path: Path) -> PickleScan | None:
    """torch.load tries its legacy tar format before anything else, and it unpickles three members of the tar
    with no allow-list (`weights_only=False`); no adapter is saved that way, so any tar is refused."""
    import tarfile

    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, ValueError, UnicodeError, EOFError, OverflowError):
        return None
    result = PickleScan("tar", refused="a tar archive: torch.load reads it in its legacy tar format, which unpickles "
                                       "its members (storages, tensors, pickle) with no allow-list")
    with tar:
        try:
            for n, member in enumerate(tar):
                if n >= 64:
                    break
                if member.name in _TAR_PICKLES and member.isfile() and member.size <= _MAX_PICKLE:
                    fh = tar.extractfile(member)
                    if fh is not None:
                        _walk_all(result, fh.read(_MAX_PICKLE))
        except (tarfile.TarError, ValueError, UnicodeError, EOFError, OverflowError, OSError):
            pass  # the refusal stands; the globals only explain it
    return result


def _scan_stream(path: Path) -> PickleScan:
    result = PickleScan("pickle")
    with open(path, "rb") as fh:
        size = fh.seek(0, io.SEEK_END)
        if size == 0:
            result.error = "the file is empty"
            return result
        fh.seek(0)
        # The pickles come first (and, in the legacy format, storages after them): only they are read.
        head = io.BytesIO(fh.read(_MAX_PICKLE))
        end = len(head.getbuffer())
        objects: list[object] = []
        while head.tell() < end and result.error is None and len(objects) < 5:
            objects.append(_run_one(result, head, collect=False, file_size=size))
        if result.error is None and _is_legacy_torch(objects):
            result.format = "legacy"
            _collect_tensors(result, objects[3])
            _legacy_storage_layout(result, fh, cast(list, objects[4]), head.tell(), size)
        elif result.error is None and head.tell() < size and len(objects) < 5:
            result.error = "bytes after the last pickle"
        elif result.error is None:
            while head.tell() < end and result.error is None:  # a file of several plain pickles
                objects.append(_run_one(result, head, collect=False, file_size=size))
            if result.error is None and end < size:
                result.error = f"pickle data runs past the first {_MAX_PICKLE >> 20} MiB (a state dict's is small)"
                result.refused = _unverified(result, result.error)
            if objects:
                _collect_tensors(result, objects[0])
    return result


def _run_one(result: PickleScan, stream: io.BytesIO, collect: bool, file_size: int | None = None) -> object:
    try:
        with gc_paused():
            obj = _Machine(result).run(stream)
    except (ValueError, IndexError, KeyError, EOFError, struct.error, UnicodeDecodeError, MemoryError, TypeError,
            OverflowError, RecursionError) as exc:
        end = len(stream.getbuffer())
        if file_size is not None and file_size > end and stream.tell() >= end:
            result.error = f"pickle data runs past the first {_MAX_PICKLE >> 20} MiB (a state dict's is small)"
            result.refused = result.refused or _unverified(result, result.error)
        else:
            result.error = f"malformed pickle: {exc}"
            if isinstance(exc, BoundReached):
                result.refused = result.refused or _unverified(result, str(exc))
        return None
    if collect:
        _collect_tensors(result, obj)
    return obj


def _unverified(result: PickleScan, why: str) -> str:
    # An unpickler reads on past the scan's bound and runs whatever comes after it.
    result.unverified = True
    return f"the scan stopped at its bound ({why}); what follows was never checked, and torch.load would run it"


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _is_legacy_torch(objects: list[object]) -> bool:
    return len(objects) == 5 and type(objects[0]) is int and objects[0] == _LEGACY_MAGIC and isinstance(objects[4], list)


def _legacy_storage_layout(result: PickleScan, fh: io.BufferedIOBase, keys: list[object], start: int, size: int) -> None:
    # After the pickles come the storages in `keys` order, each as an int64 element count and raw bytes.
    storages = {t.storage.key: t.storage for t in (result.tensors or {}).values()}
    problem = _views_problem(result.tensors or {})
    if problem:
        result.error = problem
        return
    fh.seek(start)
    for key in keys:
        header = fh.read(8)
        if len(header) < 8:
            result.error = "file ends before all storages are stored (truncated)"
            return
        (numel,) = struct.unpack("<q", header)
        storage = storages.get(key) if isinstance(key, str) else None
        if not isinstance(key, str) or storage is None or numel < 0 or numel != storage.numel:
            result.error = f"cannot size storage {describe(key)!r} ({numel:,} elements stored)"
            return
        at, nbytes = fh.tell(), numel * (element_bytes(storage.dtype or "") or 0)
        if nbytes > size - at:
            result.error = f"file ends inside storage {describe(key)!r} (truncated)"
            return
        result.storage_offsets[key] = at
        fh.seek(at + nbytes)
    missing = next((k for k in storages if k not in result.storage_offsets), None)
    if missing is not None:
        result.error = f"storage {describe(missing)!r} is not in the file"
    elif fh.tell() != size:
        result.error = "file size does not match its storages (truncated or trailing bytes)"
