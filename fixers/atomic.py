"""Replace files in an adapter folder all at once, keeping every original byte.

The new folder is built beside the old one (unchanged files hard-linked, changed ones written and
fsynced, originals of changed files hard-linked into `.doctor-backup/<stamp>/`), then the two folders
are swapped with one atomic `renameat2(RENAME_EXCHANGE)`. A crash before the swap leaves the original
untouched; after it, the fixed folder is complete. There is never a mix of old and new files.

Files that are symbolic links are never replaced by a copy. A link to a file inside the folder has that
file replaced in the new folder. A link out of it is written through to its target (each atomically), the
original kept beside the target and named in a journal (`journal.py`) until the swap is done, so that the
next run finishes or undoes a killed one. A link into a Hugging Face cache blob, which other snapshots may
share, is refused (`--out` writes a copy). Immutable files are refused before anything is written.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .journal import STAGING_MARK, Journal, clear_temps, crash_point, fsync_dir, leftovers, recover
from .preflight import FixWriteError, link_targets, refuse_immutable, writable

Writer = Callable[[Path], None]  # writes one new file at the given path (and fsyncs it)
BACKUP_DIR = ".doctor-backup"


@dataclass(frozen=True)
class Fingerprint:
    """What a file was when planning began. Small files (the config) are hashed too: a save within one
    clock tick of the last can keep size and mtime."""

    size: int
    mtime_ns: int  # not ctime: the backup's hard link changes it
    inode: int
    digest: str | None = None

    @classmethod
    def of(cls, path: Path) -> "Fingerprint":
        st = path.stat()
        digest = None
        if st.st_size <= SMALL_FILE:
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read(SMALL_FILE + 1)).hexdigest()
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, digest)


SMALL_FILE = 1 << 20


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


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError as exc:  # no hard links on this filesystem: a copy keeps the original intact just the same
        if exc.errno == errno.EPERM:
            refuse_immutable(src, [])  # a link the kernel refuses may mean a file nothing can remove
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
    A file that links to another inside the folder has that file replaced in the new folder; one that
    links outside it is written through, its original kept beside it (named in the journal) until the
    swap is done, so that a killed run is finished or undone by the next (`journal.recover`).
    """
    root = root.resolve()
    recover(root)
    for name in [*writers, *remove]:
        if (root / name).exists():
            writable(root / name)
    through, inside = link_targets(root, writers)
    refuse_immutable(root, through.values())
    for real in through.values():
        clear_temps(real)
    run = stamp()
    staging = root.with_name(f"{STAGING_MARK}{root.name}-{run}")
    backup_rel = Path(BACKUP_DIR) / run
    journal = Journal.begin(root, run, staging, through)
    with _all_or_nothing(f"the fix in {root.parent}", lambda: _settle_quietly(journal)):
        crash_point("journal")
        staging.mkdir()
        shutil.copystat(root, staging)
        _mirror(root, staging, (set(writers) - set(inside)) | remove)
        backup = staging / backup_rel
        backup.mkdir(parents=True)
        for name in (set(writers) | remove) - set(through):
            source = root / inside.get(name, name)
            if source.exists() or source.is_symlink():
                _link_or_copy(source, backup / name)
        crash_point("staging")
        for name, write in writers.items():
            if name in through:
                link = journal.links[name]
                write(link.tmp)
                shutil.copymode(link.real, link.tmp)
                os.symlink(link.tmp, staging / name)  # so that `verify` sees the new content
            else:
                path = staging / inside.get(name, name)
                path.unlink(missing_ok=True)
                write(path)
                if (root / inside.get(name, name)).exists():
                    shutil.copymode(root / inside.get(name, name), path)
        crash_point("written")
        verify(staging)
        guard()
        crash_point("verified")
        for name, link in journal.links.items():  # outside the folder, so outside the swap: each atomic alone
            (staging / name).unlink()
            os.symlink(os.readlink(root / name), staging / name)
            _link_or_copy(link.real, backup / name)
            journal.keep_original(link)
            crash_point("saved")
            os.replace(link.tmp, link.real)
            fsync_dir(link.real.parent)
            crash_point("replaced")
        for folder in _folders(staging) + [backup, backup.parent]:
            fsync_dir(folder)
        _exchange(root, staging)
        fsync_dir(root.parent)
        crash_point("swapped")
    journal.settle()  # the staging path now holds the old folder, whose files all live on in the new one or its backup
    return root / backup_rel


def _settle_quietly(journal: Journal) -> None:
    try:
        journal.settle()
    except OSError:
        pass  # the journal stays, and the next run settles it


def _folders(top: Path) -> list[Path]:
    return [Path(folder) for folder, _, _ in os.walk(top)]


def write_copy(root: Path, out: Path, writers: dict[str, Writer], remove: set[str], verify: Callable[[Path], None]) -> None:
    """Write the fixed adapter to `out` (which must not exist), leaving `root` untouched."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FixWriteError(f"{out} exists and is not empty; choose a new folder for --out")
    recover(out)  # a killed earlier --out run's staging folder
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
    writable(path)
    link_targets(path.parent.resolve(), [path.name])  # refuses a shared cache blob
    clear_temps(real)
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
    """Staging folders and journals that runs left beside `root`."""
    return leftovers(root)


def clear_leftovers(root: Path) -> list[Path]:
    """Finish or undo what killed runs left beside `root`; a run still alive keeps its own."""
    return recover(root)
