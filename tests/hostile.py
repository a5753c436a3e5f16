"""Helpers for hostile-input tests: run the doctor in a child process, and build torch archives by hand.

A child process is the only way to see a segfault, a hang or a memory peak without taking the test
run down with it. Archives are built from opcodes so that a test can claim what torch never writes
(a 2**61-element storage, a view outside its storage) without torch.
"""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

_CHILD = r"""
import io, json, resource, sys, time
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a runaway allocation fails here, not on the host
from rich.console import Console
from adapter_doctor import Options, diagnose
from adapter_doctor.render.rich_report import render_target

raised, findings, errors = None, [], []
start = time.perf_counter()
try:
    report = diagnose([sys.argv[1]], Options(**json.loads(sys.argv[2])))
    seconds = time.perf_counter() - start
    console = Console(file=io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), width=100)
    for target in report.targets:
        console.print(render_target(target, verbose=True))
        console.file.flush()
        errors += [target.error] if target.error else []
    findings = [f.to_dict() for f in report.findings]
except BaseException as exc:
    seconds = time.perf_counter() - start
    raised = f"{type(exc).__name__}: {exc}"[:500]
try:
    with open("/proc/self/status") as fh:  # VmHWM starts afresh with the process; ru_maxrss survives exec
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"raised": raised, "seconds": seconds, "peak": peak, "findings": findings, "errors": errors}))
"""


@dataclass
class Outcome:
    returncode: int
    raised: str | None = None
    seconds: float = 0.0
    peak: int = 0
    findings: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stderr: str = ""

    @property
    def ids(self) -> set[str]:
        return {f["id"] for f in self.findings}

    def messages(self, check_id: str) -> list[str]:
        return [f["message"] for f in self.findings if f["id"] == check_id]


def run_isolated(path: Path | str, *, timeout: float = 60, memory: int = 3 << 30, **options) -> Outcome:
    """`diagnose([path])` and a rich rendering of it in a fresh interpreter, with its time and peak memory."""
    cmd = [sys.executable, "-c", _CHILD, str(path), json.dumps(options), str(memory)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        return Outcome(proc.returncode, stderr=proc.stderr[-2000:])
    return Outcome(proc.returncode, stderr=proc.stderr[-2000:], **json.loads(proc.stdout.splitlines()[-1]))


def assert_contained(outcome: Outcome, *, seconds: float = 5.0, peak: int = 1 << 30) -> None:
    """No signal, no exception out of diagnose(), no internal-error finding, no hang, no memory blow-up."""
    assert outcome.returncode == 0, f"child exited with {outcome.returncode}: {outcome.stderr}"
    assert outcome.raised is None, outcome.raised
    assert "ADC000" not in outcome.ids, outcome.findings
    assert outcome.seconds < seconds, f"took {outcome.seconds:.1f} s"
    assert outcome.peak < peak, f"peak memory {outcome.peak / 2**20:.0f} MiB"


# --- torch archives, opcode by opcode -------------------------------------------------------------

def _uni(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
    if -(1 << 31) <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


@dataclass(frozen=True)
class View:
    """One pickled tensor: a view of storage `key` as torch's _rebuild_tensor_v2 receives it."""

    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None  # None: C-contiguous
    offset: int = 0
    key: str = "0"
    storage: str = "FloatStorage"
    numel: int | None = None  # the storage's element count; None: just what the view needs

    def strides(self) -> tuple[int, ...]:
        if self.stride is not None:
            return self.stride
        out, step = [], 1
        for d in reversed(self.shape):
            out.append(step)
            step *= d
        return tuple(reversed(out))

    def storage_numel(self) -> int:
        if self.numel is not None:
            return self.numel
        if 0 in self.shape:
            return self.offset
        return self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.strides())) + 1


def torch_pickle(views: dict[str, View]) -> bytes:
    """A state-dict data.pkl in the form torch.save writes (protocol 2, persistent storage ids)."""
    body = b"\x80\x02}("
    for name, v in views.items():
        pid = _tuple([_uni("storage"), f"ctorch\n{v.storage}\n".encode(), _uni(v.key), _uni("cpu"), _int(v.storage_numel())])
        args = pid + b"Q" + _int(v.offset) + _tuple(map(_int, v.shape)) + _tuple(map(_int, v.strides()))
        args += b"\x89ccollections\nOrderedDict\n)R"
        body += _uni(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"
    return body + b"u."


def torch_zip(path: Path, views: dict[str, View], storages: dict[str, bytes] | None = None, *,
              compression: int = zipfile.ZIP_STORED, prefix: str = "archive/", byteorder: str = "little") -> Path:
    """Write a torch zip archive; storages default to zero bytes of the size each view implies."""
    if storages is None:
        sizes: dict[str, int] = {}
        for v in views.values():
            sizes[v.key] = max(sizes.get(v.key, 0), v.storage_numel() * 4)
        storages = {k: bytes(n) for k, n in sizes.items()}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(prefix + "data.pkl", torch_pickle(views))
        zf.writestr(prefix + "byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"{prefix}data/{key}", raw, compress_type=compression)
        zf.writestr(prefix + "version", "3\n")
    return path


def member_span(archive: bytes, name: str) -> tuple[int, int]:
    """The absolute byte range of a member's (compressed) data inside `archive`."""
    info = zipfile.ZipFile(io.BytesIO(archive)).getinfo(name)
    name_len, extra_len = struct.unpack_from("<HH", archive, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size
