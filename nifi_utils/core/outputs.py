"""The command line's output paths, checked before any work and written all-or-nothing.

`check_out_file` and `check_out_dir` turn every way an output path can be wrong (a folder where a file
is expected or the reverse, a parent that is a file, a folder that cannot be created or written in) into
one `NifiError` that names the path, before a command reads or computes anything expensive.

`staged()` writes a command's files beside their targets under temporary names and renames them into
place only once every one is written; an error half way removes the temporaries and the folders it
made, so a failed command leaves nothing behind (and an existing file is never half overwritten).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from nifi_utils.core.common import NifiError


def _nearest_existing(p: Path) -> Path:
    """p itself or its closest ancestor that exists (lstat fails under a file or a folder we cannot search)."""
    while not os.path.lexists(p) and p.parent != p:
        p = p.parent
    return p


def _check_can_create_in(folder: Path, path: Path, flag: str) -> None:
    """`folder` (to be made if missing) can hold new entries: its nearest existing ancestor is a folder in
    which a file can be created (probed with a temporary file: permission bits do not stop root, a
    read-only or virtual file system does)."""
    a = _nearest_existing(folder)
    if not a.is_dir():
        raise NifiError(f"{flag} {path}: {a} is {'a file, not a folder' if a.is_file() else 'not a folder'}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nifi-write-check-", dir=a)
    except OSError as e:
        raise NifiError(f"{flag} {path}: cannot create files in {a} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output file path that can be written: not a folder, under folders that exist or can be made."""
    p = Path(path)
    if p.is_dir():
        raise NifiError(f"{flag} {p} is a folder; give a file name")
    _check_can_create_in(p.parent, p, flag)
    return p


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output folder (made if missing) in which files can be written; not an existing file."""
    p = Path(path)
    if os.path.lexists(p) and not p.is_dir():
        raise NifiError(f"{flag} {p} is a file; give a folder (made if missing)")
    _check_can_create_in(p, p, flag)
    return p


class _Staging:
    def __init__(self, flag: str):
        self.flag = flag
        self.pending: list[tuple[Path, Path]] = []  # (temporary, target)
        self.made: list[Path] = []  # folders this staging created, outermost first

    def folder(self, path: str | os.PathLike) -> Path:
        """Make a folder (and its missing parents), removed again if the staging fails."""
        path = Path(path)
        missing = []
        p = path
        while not os.path.lexists(p) and p.parent != p:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as e:
                raise NifiError(f"{self.flag} {path}: cannot make folder {d} ({e.strerror or e})") from None
            self.made.append(d)
        if not path.is_dir():
            raise NifiError(f"{self.flag} {path} is a file, not a folder")
        return path

    def write(self, target: str | os.PathLike, write_fn) -> Path:
        """`write_fn(tmp)` writes the file; tmp sits beside `target` and keeps its suffix (for writers that
        pick the format from it). An OSError (no space, wrong image mode for the format, ...) becomes one
        NifiError naming the target."""
        target = Path(target)
        self.folder(target.parent)
        if target.is_dir():
            raise NifiError(f"{self.flag} {target} is a folder; give a file name")
        tmp = target.with_name(f".{target.stem}.partial-{os.getpid()}-{len(self.pending)}{target.suffix}")
        self.pending.append((tmp, target))
        try:
            write_fn(tmp)
        except OSError as e:
            raise NifiError(f"cannot write {target} ({e.strerror or e})") from None
        return target

    def commit(self):
        for i, (tmp, target) in enumerate(self.pending):
            try:
                os.replace(tmp, target)
            except OSError as e:
                done = [str(t) for _, t in self.pending[:i]]
                self.pending = self.pending[i:]
                raise NifiError(f"cannot write {target} ({e.strerror or e})"
                                + (f"; already written: {', '.join(done)}" if done else "")) from None
        self.pending, self.made = [], []

    def discard(self):
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        for d in reversed(self.made):
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: someone else wrote there meanwhile
        self.pending, self.made = [], []


@contextmanager
def staged(flag: str = "--out"):
    """`with staged() as out: out.write(path, fn); ...`: every file appears at the end of the block, or none."""
    s = _Staging(flag)
    try:
        yield s
        s.commit()
    finally:
        s.discard()  # nothing left to discard after a commit
