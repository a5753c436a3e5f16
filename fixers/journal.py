"""The journal of one `--inplace` fix, so that a run killed at any moment is finished or undone by the next.

It lives beside the adapter (`.doctor-journal-<name>-<stamp>.json`), is written before anything else, and
names everything the run may create: its staging folder, and for each file written through a symlink to
outside the folder, the new content's temp file and a link to the original content (`.orig`) that stays
beside the target until the folders are swapped. Whether the swap happened is read from the folder's inode.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

JOURNAL_MARK = ".doctor-journal-"
STAGING_MARK = ".doctor-staging-"
KILL_ENV = "ADAPTER_DOCTOR_KILL_AT"  # fault-injection tests: SIGKILL the fixer at this point
POINTS = ("journal", "staging", "written", "verified", "saved", "replaced", "swapped", "discarded", "settled")
_STAMP = r"\d{8}-\d{6}-(\d+)"


def crash_point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Link:
    """A file written through a symlink: its real target, the new content, and the original kept aside."""

    name: str
    real: Path
    tmp: Path
    saved: Path

    @property
    def part(self) -> Path:
        return self.saved.with_name(self.saved.name + ".part")


class Journal:
    def __init__(self, path: Path, root: Path, staging: Path, root_inode: int, links: dict[str, Link]):
        self.path, self.root, self.staging, self.root_inode, self.links = path, root, staging, root_inode, links

    @classmethod
    def begin(cls, root: Path, run: str, staging: Path, through: dict[str, Path]) -> "Journal":
        links = {name: Link(name, real, real.with_name(f".{real.name}.doctor-{run}.tmp"),
                            real.with_name(f".{real.name}.doctor-{run}.orig")) for name, real in through.items()}
        journal = cls(root.with_name(f"{JOURNAL_MARK}{root.name}-{run}.json"), root, staging, root.stat().st_ino, links)
        data = {"root": str(root), "staging": str(staging), "root_inode": journal.root_inode,
                "links": [{"name": k.name, "real": str(k.real), "tmp": str(k.tmp), "saved": str(k.saved)}
                          for k in links.values()]}
        fd = os.open(journal.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps(data).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(root.parent)
        return journal

    @classmethod
    def load(cls, path: Path) -> "Journal | None":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            links = {d["name"]: Link(d["name"], Path(d["real"]), Path(d["tmp"]), Path(d["saved"])) for d in data["links"]}
            return cls(path, Path(data["root"]), Path(data["staging"]), int(data["root_inode"]), links)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # cut short while it was written: nothing else had been done yet

    def keep_original(self, link: Link) -> None:
        """Keep the target's original bytes beside it (a hard link, else a complete copy) before it is replaced."""
        try:
            os.link(link.real, link.saved)
        except OSError:
            shutil.copy2(link.real, link.part)
            with open(link.part, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(link.part, link.saved)  # `saved` exists only once it is whole
        fsync_dir(link.saved.parent)

    def swapped(self) -> bool:
        try:
            return self.root.stat().st_ino != self.root_inode
        except OSError:
            return False

    def settle(self) -> None:
        """Finish the fix if the folders were swapped, else put every write-through target back."""
        done = self.swapped()
        for link in self.links.values():
            if not done and link.saved.exists():
                os.replace(link.saved, link.real)  # a no-op when both are still the same file
                fsync_dir(link.real.parent)
        shutil.rmtree(self.staging, ignore_errors=True)
        crash_point("discarded")
        for link in self.links.values():
            for path in (link.tmp, link.saved, link.part):
                path.unlink(missing_ok=True)
        crash_point("settled")
        self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)


def _dead(pid: str) -> bool:
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def recover(root: Path) -> list[Path]:
    """Finish or undo what killed runs left beside `root`, and remove their staging folders."""
    root = root.resolve()
    cleared = []
    journal_name = re.compile(re.escape(f"{JOURNAL_MARK}{root.name}-") + _STAMP + r"\.json")
    staging_name = re.compile(re.escape(f"{STAGING_MARK}{root.name}-") + _STAMP)
    try:
        entries = sorted(root.parent.iterdir())
    except OSError:
        return cleared
    for path in entries:
        found = journal_name.fullmatch(path.name)
        if found and _dead(found.group(1)):
            journal = Journal.load(path)
            if journal is None:
                path.unlink(missing_ok=True)
            elif journal.root == root:
                journal.settle()
            cleared.append(path)
    for path in entries:
        found = staging_name.fullmatch(path.name)
        if found and path.exists() and _dead(found.group(1)):
            shutil.rmtree(path, ignore_errors=True)
            cleared.append(path)
    return cleared


def clear_temps(real: Path) -> list[Path]:
    """Remove the temp files of new content that killed runs left beside `real` (this and earlier releases)."""
    stem, suffix = re.escape(real.stem), re.escape(real.suffix)
    names = re.compile(rf"\.{re.escape(real.name)}\.(?:doctor-)?{_STAMP}\.tmp|\.{stem}\.doctor-{_STAMP}{suffix}")
    cleared = []
    for path in real.parent.glob(f".{real.stem}.*"):
        found = names.fullmatch(path.name)
        if found and _dead(next(g for g in found.groups() if g)) and path.is_file():
            path.unlink(missing_ok=True)  # new content only: an original is never kept under these names
            cleared.append(path)
    return cleared


def leftovers(root: Path) -> list[Path]:
    root = root.resolve()
    return sorted(p for p in root.parent.iterdir()
                  if p.name.startswith((f"{JOURNAL_MARK}{root.name}-", f"{STAGING_MARK}{root.name}-")))
