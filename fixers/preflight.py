"""What makes an in-place fix impossible or unsafe, found before anything is written."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path


class FixWriteError(Exception):
    """Writing the fix failed; the original files are intact."""


def writable(path: Path) -> None:
    mode = path.lstat().st_mode if not path.is_symlink() else path.resolve().stat().st_mode
    if not mode & stat.S_IWUSR:
        raise FixWriteError(f"{path} is read-only; make it writable (chmod u+w) or write a fixed copy with --out DIR")


def link_targets(root: Path, names) -> tuple[dict[str, Path], dict[str, Path]]:
    """Split the symlinked ones of `names` into links out of `root` (written through) and links inside it."""
    through, inside = {}, {}
    for name in names:
        if not (root / name).is_symlink():
            continue
        real = (root / name).resolve()
        if real.is_relative_to(root):
            inside[name] = real.relative_to(root)
        elif _shared_blob(real):
            raise FixWriteError(f"{root / name} links to {real}, a blob of a Hugging Face cache that other snapshots "
                                "may share; rewriting it would change them too. Write a fixed copy with --out DIR")
        else:
            through[name] = real
    return through, inside


def _shared_blob(real: Path) -> bool:
    return real.parent.name == "blobs" and (real.parent.parent / "snapshots").is_dir()


_IMMUTABLE = 0x00000010 | 0x00000020  # FS_IMMUTABLE_FL, FS_APPEND_FL: such a file can be neither replaced nor removed


def _attribute_flags(path: Path) -> int:
    st = path.lstat()
    if hasattr(st, "st_flags"):  # BSD and macOS
        return _IMMUTABLE if st.st_flags & (stat.UF_IMMUTABLE | stat.SF_IMMUTABLE | stat.UF_APPEND | stat.SF_APPEND) else 0
    if not sys.platform.startswith("linux") or stat.S_ISLNK(st.st_mode):
        return 0
    import fcntl
    import struct

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, 0x80086601, b"\0" * 8)[:4])[0]  # FS_IOC_GETFLAGS
    except OSError:
        return 0  # a filesystem without attribute flags
    finally:
        os.close(fd)


def refuse_immutable(root: Path, targets) -> None:
    """Every file of the old folder is removed after the swap, and each write-through target replaced."""
    paths = [root, *targets]
    for folder, dirs, names in os.walk(root):
        paths += [Path(folder, n) for n in dirs + names]
    for path in paths:
        if _attribute_flags(path) & _IMMUTABLE:
            raise FixWriteError(f"{path} is immutable or append-only (chattr +i/+a), so the fix could not be completed; "
                                "nothing was changed. Clear the flag (chattr -i) or write a fixed copy with --out DIR")
