"""``ihld validate``: run intake's checks on job files without submitting them."""

from __future__ import annotations

import os
from pathlib import Path

from ihld.common.errors import JobError
from ihld.core.config import load_config
from ihld.core.entries import read_entries
from ihld.core.inbox import JOB_SUFFIXES
from ihld.plugins.host import PluginHost
from ihld.plugins.loader import plugins_for


def validate_bytes(name: str, data: bytes, host: PluginHost) -> list[str]:
    """Problems in one file's content, one line each; empty when valid."""
    stem, suffix = os.path.splitext(name)
    problems = []
    seen: set[str] = set()
    for entry in read_entries(stem, suffix, data, list(host.formats.values())):
        where = f"line {entry.line}: " if entry.line is not None else ""
        if entry.error is not None:
            problems.append(str(entry.error))
            continue
        if entry.job_id in seen:
            problems.append(f"{where}duplicate id {entry.job_id!r} in this file")
            continue
        seen.add(entry.job_id)
        assert entry.spec is not None
        try:
            host.resolve(entry.spec, entry.job_id, source={"file": name})
        except JobError as exc:
            problems.append(f"{where}{exc}")
    return problems


def validate_paths(paths: list[Path], config_path: str | None) -> int:
    config = load_config(config_path)
    host = plugins_for(config)
    status = 0
    for path in paths:
        if not path.name.endswith(JOB_SUFFIXES):
            print(f"{path}: INVALID\n  job files must be named *.json or *.jsonl")
            status = 1
            continue
        if path.is_symlink() or not path.is_file():
            print(f"{path}: INVALID\n  not a regular file")
            status = 1
            continue
        size = path.stat().st_size
        if size > config.limits.max_job_bytes:
            print(f"{path}: INVALID\n  {size} bytes, over [limits] max_job_bytes")
            status = 1
            continue
        problems = validate_bytes(path.name, path.read_bytes(), host)
        if problems:
            status = 1
            print(f"{path}: INVALID")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(f"{path}: ok")
    return status
