"""Crash-safe file writes: a file is either the old complete one or the new complete one.

:func:`atomic_write` writes into a temporary file in the same directory, flushes it to disk
(``os.fsync``), renames it over the final name (``os.replace``, atomic on POSIX) and syncs the
directory, so a killed process or a power loss never leaves a half-written file under the final
name. :func:`fsync_path` / :func:`fsync_dir` are the building blocks (also used for checkpoint
folders). No tensors here.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "fsync_path", "fsync_dir", "temp_name"]


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside ``path``: ``.<name>.<kind>-<pid>-<random>``."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a written file's data (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory's entries (renames, creations) to disk; ignored where unsupported."""
    try:
        fsync_path(path)
    except OSError:  # e.g. file systems that refuse fsync on directories
        pass


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Writes ``path`` atomically: ``write_fn(tmp_path)`` writes the whole content to ``tmp_path``.

    Then the temporary is fsynced, renamed onto ``path`` with ``os.replace`` and the directory is
    fsynced. If ``write_fn`` (or anything else) raises, the temporary is removed, ``path`` keeps
    its old content (or stays absent) and the exception propagates. Returns ``Path(path)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write_fn(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path
