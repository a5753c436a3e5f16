"""Replace files in an adapter folder all at once, keeping every original byte.

The new folder is built beside the old one (unchanged files hard-linked, changed ones written and
fsynced, originals of changed files hard-linked into `.doctor-backup/<stamp>/`), then the two folders
are swapped with one atomic `renameat2(RENAME_EXCHANGE)`. A crash before the swap leaves the original
untouched; after it, the fixed folder is complete. There is never a mix of old and new files.

Files that are symbolic links are written through to their targets (each atomically), never
replaced by a copy.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator

Writer = Callable[[Path], None]  # writes one new file at the given path (and fsyncs it)
BACKUP_DIR = ".doctor-backup"
STAGING_MARK = ".doctor-staging-"


class FixWriteError(Exception):
    """Writing the fix failed; the original files are intact."""


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> "Fingerprint":
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2, macOS renamex_np)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        raise FixWriteError("this system cannot swap folders atomically; use --out DIR instead of --inplace")
    if rc != 0:
        err = ctypes.get_errno()
        raise FixWriteError(f"cannot swap {a} atomically: {os.strerror(err)}; use --out DIR instead of --inplace")


@contextmanager
def _all_or_nothing(where: str, cleanup: Callable[[], None]) -> Iterator[None]:
    """On any failure, undo what was built (`cleanup`) and say in one line what went wrong."""
    try:
        yield
    except OSError as exc:
        cleanup()
        detail = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise FixWriteError(f"could not write {where}: {detail}; the original is unchanged") from None
    except BaseException:
        cleanup()
        raise


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def _writable(path: Path) -> None:
    mode = path.lstat().st_mode if not path.is_symlink() else path.resolve().stat().st_mode
    if not mode & stat.S_IWUSR:
        raise FixWriteError(f"{path} is read-only; make it writable (chmod u+w) or write a fixed copy with --out DIR")


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this filesystem: a copy keeps the original intact just the same
        shutil.copy2(src, dst)


def _mirror(src: Path, dst: Path, skip: set[str]) -> None:
    """Recreate `src` under `dst` with hard links, except the top-level names in `skip`."""
    for entry in sorted(src.iterdir()):
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            target.mkdir()
            shutil.copystat(entry, target)
            _mirror(entry, target, set())
        else:
            _link_or_copy(entry, target)


def replace_in_place(root: Path, writers: dict[str, Writer], remove: set[str],
                     guard: Callable[[], None], verify: Callable[[Path], None]) -> Path:
    """Swap in a copy of `root` with `writers`' files replaced and `remove` gone; return the backup folder.

    `guard` raises if the inputs changed since the plan was made; `verify` raises if the new folder
    (at its staging path) is not what was intended. Either way the original stays as it was.
    """
    root = root.resolve()
    clear_leftovers(root)
    for name in [*writers, *remove]:
        if (root / name).exists():
            _writable(root / name)
    staging = root.with_name(f"{STAGING_MARK}{root.name}-{stamp()}")
    backup_rel = Path(BACKUP_DIR) / stamp()
    linked = {n for n in writers if (root / n).is_symlink()}
    pending: dict[str, tuple[Path, Path]] = {}  # symlinked files: (real target, its new content beside it)

    def cleanup() -> None:
        _discard(staging)
        for _, tmp in pending.values():
            tmp.unlink(missing_ok=True)

    with _all_or_nothing(f"the fix in {root.parent}", cleanup):
        staging.mkdir()
        shutil.copystat(root, staging)
        _mirror(root, staging, set(writers) | remove)
        backup = staging / backup_rel
        backup.mkdir(parents=True)
        for name in (set(writers) | remove) - linked:
            if (root / name).exists():
                _link_or_copy(root / name, backup / name)
        for name, write in writers.items():
            if name in linked:
                real = (root / name).resolve()
                pending[name] = (real, real.with_name(f".{real.name}.{stamp()}.tmp"))
                write(pending[name][1])
                shutil.copymode(real, pending[name][1])
                os.symlink(pending[name][1], staging / name)  # so that `verify` sees the new content
            else:
                write(staging / name)
                if (root / name).exists():
                    shutil.copymode(root / name, staging / name)
        for folder in (backup, backup.parent, staging):
            fsync_dir(folder)
        verify(staging)
        guard()
        for name, (real, tmp) in pending.items():  # outside the folder, so outside the swap: each atomic alone
            (staging / name).unlink()
            os.symlink(os.readlink(root / name), staging / name)
            shutil.copy2(real, backup / name)
            os.replace(tmp, real)
            fsync_dir(real.parent)
        _exchange(root, staging)
        fsync_dir(root.parent)
    _discard(staging)  # now holds the old folder, whose files all live on in the new one or its backup
    return root / backup_rel


def write_copy(root: Path, out: Path, writers: dict[str, Writer], remove: set[str], verify: Callable[[Path], None]) -> None:
    """Write the fixed adapter to `out` (which must not exist), leaving `root` untouched."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FixWriteError(f"{out} exists and is not empty; choose a new folder for --out")
    staging = out.with_name(f"{STAGING_MARK}{out.name}-{stamp()}")
    with _all_or_nothing(str(out), lambda: _discard(staging)):
        staging.mkdir(parents=True)
        for entry in sorted(root.iterdir()):
            if entry.name in set(writers) | remove or entry.name == BACKUP_DIR:
                continue
            if entry.is_dir():
                shutil.copytree(entry, staging / entry.name, symlinks=False)
            else:
                shutil.copy2(entry, staging / entry.name)  # a copy of a symlink's content, as --out promises
        for name, write in writers.items():
            write(staging / name)
        fsync_dir(staging)
        verify(staging)
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
        fsync_dir(out.parent)


def replace_file(path: Path, write: Writer, guard: Callable[[], None], verify: Callable[[Path], None]) -> Path:
    """Replace one file atomically (temp file, fsync, rename, fsync the folder); return the backup folder."""
    real = path.resolve()  # a symlink is written through
    _writable(path)
    tmp = real.with_name(f".{real.stem}.doctor-{stamp()}{real.suffix}")
    backup = path.parent / BACKUP_DIR / stamp()
    with _all_or_nothing(str(path), lambda: tmp.unlink(missing_ok=True)):
        write(tmp)
        shutil.copymode(real, tmp)
        verify(tmp)
        backup.mkdir(parents=True)
        shutil.copy2(real, backup / path.name)
        fsync_dir(backup)
        guard()
        os.replace(tmp, real)
        fsync_dir(real.parent)
    return backup


def write_copy_file(path: Path, out: Path, write: Writer, verify: Callable[[Path], None]) -> None:
    """Write the fixed version of one file to `out`, leaving `path` untouched."""
    if out.exists():
        raise FixWriteError(f"{out} exists; choose a new file name for --out")
    tmp = out.with_name(f".{out.stem}.doctor-{stamp()}{out.suffix}")
    with _all_or_nothing(str(out), lambda: tmp.unlink(missing_ok=True)):
        write(tmp)
        verify(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def leftover_staging(root: Path) -> list[Path]:
    """Staging folders a killed run left beside `root` (the original is intact; they can go)."""
    root = root.resolve()
    return sorted(root.parent.glob(f"{STAGING_MARK}{root.name}-*"))


def clear_leftovers(root: Path) -> list[Path]:
    """Remove what killed runs left beside `root`; a run still alive keeps its own."""
    cleared = []
    for path in leftover_staging(root):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            _discard(path)
            cleared.append(path)
    return cleared


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
