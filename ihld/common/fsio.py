"""File-system primitives for durable, atomic writes: the one place they are written.

Every durable write in ihld is: a dotted temp file in the target directory
(readers skip dotfiles), its data made durable (``fsync``, or one ``syncfs``
for a batch), then a ``rename`` (replace) or a hard ``link`` (never
overwrite; ``~2``, ``~3`` … for a taken name), then an ``fsync`` of the
directory so the new name survives a power cut. The spool, the group
committer and ``ihld submit`` all build on these.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

_seq = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
MAX_NAMES = 10_000  # a name with this many ``~N`` siblings is not free


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (new names, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(
    directory: Path, stem: str, data: bytes | Iterable[bytes], *, sync: bool = True
) -> Path:
    """A new dotted temp file in ``directory`` holding ``data`` (bytes, or chunks).

    Mode 0640 whatever the umask (the daemon reads through its group). With
    ``sync`` its data is fsynced; without, call :func:`sync_data` for a batch.
    """
    tmp = directory / f".{stem}.{os.getpid()}.{next(_seq)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        os.fchmod(fd, 0o640)
        for chunk in [data] if isinstance(data, bytes) else data:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def sync_data(root: Path, files: list[Path]) -> None:
    """Make the data of ``files`` durable: one ``syncfs`` of ``root``'s filesystem
    (one journal commit for any number of files), or an fsync each without it."""
    if _syncfs is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in files:
        fsync_file(path)


def numbered_names(name: str, suffix: str = ".json", *, first: int = 1) -> Iterator[str]:
    """``name{suffix}``, ``name~2{suffix}``, ``name~3{suffix}`` … (from ``first``)."""
    for n in range(first, MAX_NAMES):
        yield f"{name}{suffix}" if n == 1 else f"{name}~{n}{suffix}"


def link_free(
    tmp: Path, directory: Path, name: str, suffix: str = ".json", *, first: int = 1
) -> Path | None:
    """Hard-link ``tmp`` to the first free of :func:`numbered_names` (never clobbers).

    ``first=2`` skips the bare name. None only if every name is taken.
    """
    for candidate in numbered_names(name, suffix, first=first):
        target = directory / candidate
        try:
            os.link(tmp, target)
        except FileExistsError:
            continue
        return target
    return None


def link_new(tmp: Path, target: Path) -> bool:
    """Hard-link ``tmp`` to ``target``; False if ``target`` exists. ``tmp`` is removed."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def replace_durably(directory: Path, file_name: str, data: bytes) -> Path:
    """Write ``directory/file_name`` atomically, replacing it, and make it durable."""
    tmp = write_temp(directory, file_name, data)
    target = directory / file_name
    try:
        os.rename(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return target
