"""``ihld submit``: the safe way into the inbox, and the client side of the control socket.

A job file is copied to a dotted temp name inside the inbox (the watcher
ignores it), fsynced, then hard-linked to its final name, which fails
rather than overwrite a file of the same name. The daemon sees either
nothing or the whole file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp

from ihld.spool import JOB_SUFFIXES


class SubmitError(Exception):
    pass


def submit_file(source: Path, inbox: Path, name: str | None = None) -> Path:
    """Copy ``source`` into ``inbox`` atomically; return the final path."""
    name = name or source.name
    if not name.endswith(JOB_SUFFIXES) or name.startswith("."):
        raise SubmitError(f"{source}: job files must be named *.json or *.jsonl (not dotfiles)")
    if not source.is_file():
        raise SubmitError(f"{source}: not a regular file")
    if not inbox.is_dir():
        raise SubmitError(f"inbox {inbox} does not exist: is the spool right (--config)?")
    tmp = inbox / f".{name}.{os.getpid()}.tmp"
    target = inbox / name
    with open(source, "rb") as src:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        try:
            os.fchmod(fd, 0o640)  # the daemon reads it through the group, whatever the umask
            while chunk := src.read(1 << 20):
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise SubmitError(
            f"{target} already exists in the inbox (not yet claimed); rename your file"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    dirfd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return target


async def control_request(
    socket_path: Path, method: str, path: str, timeout_s: float = 3.0
) -> dict[str, Any] | None:
    """Call the daemon's control socket; None when no daemon answers."""
    if not socket_path.exists():  # noqa: ASYNC240 - a stat, before any I/O
        return None
    connector = aiohttp.UnixConnector(path=str(socket_path))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, f"http://ihld{path}") as resp,
        ):
            body: dict[str, Any] = json.loads(await resp.text())
            return body
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
