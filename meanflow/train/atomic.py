"""Crash-safe file writes: a file is either the old complete one or the new complete one.

:func:`atomic_write` writes into a temporary file in the same directory, flushes it to disk
(``os.fsync``), renames it over the final name (``os.replace``, atomic on POSIX) and syncs the
directory, so a killed process or a power loss never leaves a half-written file under the final
name. :func:`atomic_folder` does the same for a folder of files (an exported model), swapping the
new folder in for the old. :func:`fsync_path` / :func:`fsync_dir` are the building blocks (also
used for checkpoint folders). No tensors here.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["atomic_folder", "atomic_write", "atomic_write_text", "fsync_path", "fsync_dir", "remove_path",
           "temp_name"]


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


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_folder(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Writes the folder ``path`` whole: ``write_fn(tmp_dir)`` fills a fresh hidden folder beside it.

    Every file and folder in it is fsynced; an existing ``path`` is renamed aside, the new folder
    renamed onto ``path``, and the old one deleted. If ``write_fn`` raises (a Ctrl-C included),
    the temporary is removed, ``path`` keeps its old content and the exception propagates: a
    reader never finds a half-written folder under ``path``. (Between the two renames ``path`` is
    briefly absent; a kill there leaves the old folder under a hidden ``.<name>.trash-*`` name.)
    A symlinked ``path`` is written where it points. One writer at a time is assumed: the
    leftovers of a killed earlier call are removed first, and an old folder a kill left in the
    trash goes back under ``path``. Returns ``Path(path)``.
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_folder(path)
    tmp, old = temp_name(path), None
    tmp.mkdir()
    try:
        write_fn(tmp)
        for folder, _, files in os.walk(tmp):
            for name in files:
                fsync_path(os.path.join(folder, name))
            fsync_dir(folder)
        if path.exists() or path.is_symlink():
            old = temp_name(path, "trash")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # the new folder did not go in: the old one goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if old is not None:
        remove_path(old)
    return path


def remove_path(path: Path) -> None:
    """Removes a file, a link or a whole folder (a folder's errors ignored)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _recover_folder(path: Path) -> None:
    """Clears what a killed :func:`atomic_folder` of ``path`` left beside it: half-written
    temporaries are removed; of the old folders in the trash, the newest goes back under
    ``path`` if a kill between the two renames left it absent, and the rest are removed."""
    leftovers = sorted(path.parent.glob(f".{path.name}.*-*"), key=lambda p: p.stat().st_mtime)
    trash = [p for p in leftovers if p.name.startswith(f".{path.name}.trash-")]
    if trash and not (path.exists() or path.is_symlink()):
        os.replace(trash.pop(), path)
    for p in leftovers:
        if p.name.startswith((f".{path.name}.tmp-", f".{path.name}.trash-")) and p.exists():
            remove_path(p)
