"""Atomic, complete training checkpoints.

Layout of a checkpoint directory (one writer at a time)::

    directory/
      latest                       text: the name of the newest complete checkpoint folder
      step-000200/
        student.safetensors        one file per tensor group (``tensors`` argument): name -> tensor
        ema.safetensors            (any dtype, stored as given, on CPU)
        optimizer.student.safetensors + optimizer.student.json    each optimizer's state_dict
        rng.safetensors + rng.json  :func:`capture_rng` (torch CPU/CUDA, python, numpy, generators)
        state.json                 the caller's JSON-serialisable trainer state
        manifest.json              step, save sequence number, every file's size (+ sha256)
      step-000400/ ...

How it stays consistent when the process is killed at any moment: a checkpoint is written
into a hidden temporary folder, every file fsynced, then the folder is renamed to its final
name (atomic), then ``latest`` is replaced atomically, and only then are old checkpoints
deleted (beyond the newest ``keep``, by save order; a deleted folder is first renamed to a
hidden name). So ``latest`` always names a complete folder. Leftover hidden folders of a killed
save are removed by the next save. If a step's folder already exists (a final save at the same
step, or a re-run from an earlier checkpoint), the new one is named ``step-000200.1`` etc.

:func:`load_checkpoint` reads ``latest`` (or a given step or folder), validates every file
(present, right size, sha256 if recorded, parseable) and raises ``ValueError`` naming the file
otherwise; it never modifies anything. Tensors load lazily, group by group.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import warnings
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from .atomic import atomic_write, atomic_write_text, fsync_dir, fsync_path, remove_path, temp_name
from .codec import (join_tensors, load_optimizer_state, read_json, save_optimizer, save_tensors,
                    split_tensors, write_json)
from .rng import capture_rng, restore_rng

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "find_checkpoint", "list_checkpoints",
           "atomic_write", "capture_rng", "restore_rng", "save_optimizer", "load_optimizer_state"]

FORMAT = 1
LATEST = "latest"
MANIFEST = "manifest.json"
_FOLDER = re.compile(r"step-(\d+)(?:\.(\d+))?")
_GROUP = re.compile(r"[A-Za-z0-9_\-]+")
_RESERVED = {"rng", "state", "manifest"}
SHARDED = "sharded"


def _folder_step(name: str) -> int | None:
    m = _FOLDER.fullmatch(name)
    return int(m.group(1)) if m else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _GROUP.fullmatch(name) or name in _RESERVED \
            or name.startswith("optimizer"):
        raise ValueError(f"{kind}: invalid name {name!r} (letters, digits, _ and -; not "
                         f"{sorted(_RESERVED)} or optimizer*)")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def _seq(folder: Path) -> int:
    """The save sequence number of a checkpoint folder (-1 if unreadable: the oldest)."""
    try:
        return int(read_json(folder / MANIFEST)["seq"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint folders in ``directory`` (complete by construction), oldest save first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(_seq(p), _folder_step(p.name), p.name, p) for p in directory.iterdir()
             if p.is_dir() and _folder_step(p.name) is not None]
    return [p for *_, p in sorted(found)]


def _remove_leftovers(directory: Path) -> None:
    """Removes hidden temporaries of killed saves (single writer assumed)."""
    for p in directory.iterdir():
        if p.name.startswith(".") and (".tmp-" in p.name or ".trash-" in p.name):
            remove_path(p)


def _delete(folder: Path) -> None:
    trash = temp_name(folder, "trash")
    os.replace(folder, trash)  # never leaves a half-deleted folder under a checkpoint name
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(directory: str | os.PathLike, step: int, tensors: dict[str, dict[str, Tensor]],
                    state: dict | None = None, *,
                    optimizers: dict[str, torch.optim.Optimizer | dict] | None = None,
                    generators: dict[str, torch.Generator] | None = None,
                    keep: int | None = 2, checksums: bool = True) -> Path:
    """Writes a complete checkpoint of ``step`` atomically; returns its folder.

    Args:
        directory: the checkpoint directory (created if missing).
        step: the training step (int >= 0), e.g. the number of optimizer steps done.
        tensors: ``{group: {name: tensor}}``, e.g. ``{"student": student.state_dict(), "ema":
            ema.state_dict(), "fake": fake.state_dict()}``; any dtypes/devices, stored on CPU.
        state: JSON-serialisable trainer state (schedule state, counters, config dict); tuples and
            int-keyed dicts are kept exactly.
        optimizers: ``{name: optimizer or its state_dict}``.
        generators: named ``torch.Generator`` objects whose states are saved with the global
            RNG states (:func:`capture_rng` is called here).
        keep: how many checkpoints to keep (newest saves; default 2); None keeps all.
        checksums: record each file's sha256 in the manifest (default True; costs one read of
            the written files).
    """
    _check_step_and_keep(step, keep)
    for group in tensors:
        _check_name("tensors", group)
    for name in optimizers or {}:
        _check_name("optimizers", name)
    final, tmp = _begin(Path(directory), step)
    try:
        files: list[Path] = []
        for group, group_tensors in tensors.items():
            path = tmp / f"{group}.safetensors"
            save_tensors(dict(group_tensors), path)
            files.append(path)
        for opt_name, opt in (optimizers or {}).items():
            files += save_optimizer(opt, tmp / f"optimizer.{opt_name}")
        _finish(final, tmp, step, files, state, generators, checksums,
                {"groups": list(tensors), "optimizers": list(optimizers or {})}, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_step_and_keep(step, keep) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep: expected an int >= 1 or None, got {keep!r}")


def _begin(directory: Path, step: int) -> tuple[Path, Path]:
    """(final folder, its hidden temporary, created) of a new checkpoint of ``step``."""
    directory.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(directory)
    name = f"step-{step:06d}"
    rev = 0
    while (directory / name).exists():
        rev += 1
        name = f"step-{step:06d}.{rev}"
    final = directory / name
    tmp = temp_name(final)
    tmp.mkdir()
    return final, tmp


def _finish(final: Path, tmp: Path, step: int, files: list[Path], state: dict | None, generators,
            checksums: bool, contents: dict, keep: int | None) -> None:
    """Adds the RNG, the state and the manifest (``contents`` names the groups) to ``tmp``
    holding ``files``, fsyncs, renames it to ``final``, points ``latest`` at it and prunes."""
    directory = final.parent
    existing = [p for p in list_checkpoints(directory) if p != final]
    seq = 1 + max((_seq(p) for p in existing), default=-1)
    rng_structure, rng_tensors = split_tensors(capture_rng(generators))
    save_tensors(rng_tensors, tmp / "rng.safetensors")
    write_json(rng_structure, tmp / "rng.json")
    state_structure, state_tensors = split_tensors(state or {})
    if state_tensors:
        raise TypeError(f"state: expected JSON-serialisable values, found tensors at "
                        f"{sorted(state_tensors)} (put tensors in `tensors`)")
    write_json(state_structure, tmp / "state.json")
    files = files + [tmp / "rng.safetensors", tmp / "rng.json", tmp / "state.json"]
    for f in files:
        fsync_path(f)
    manifest = {
        "format": FORMAT, "step": step, "seq": seq, **contents,
        "files": {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size,
                                                  **({"sha256": _sha256(f)} if checksums else {})}
                  for f in files},
    }
    write_json(manifest, tmp / MANIFEST)
    fsync_path(tmp / MANIFEST)
    for folder in {f.parent for f in files}:
        fsync_dir(folder)
    os.rename(tmp, final)
    fsync_dir(directory)
    atomic_write_text(directory / LATEST, final.name + "\n")
    if keep is not None:
        for old in existing[: max(0, len(existing) + 1 - keep)]:
            _delete(old)


def save_sharded_checkpoint(directory: str | os.PathLike, step: int, sharded: dict[str, dict],
                            state: dict | None = None, *, ranks,
                            generators: dict[str, torch.Generator] | None = None,
                            keep: int | None = 2, checksums: bool = True) -> Path:
    """:func:`save_checkpoint` for models sharded over ranks: every rank calls it.

    ``sharded`` is ``{name: state_dict}`` of DTensors (and plain tensors) as
    ``torch.distributed.checkpoint`` takes them (e.g. ``get_model_state_dict``,
    ``get_optimizer_state_dict``); each rank writes its shards into ``sharded/`` of the
    checkpoint folder. Rank 0 writes the rest (``state``, the RNG states of rank 0 and of
    ``generators``, which every rank holds in the same state), the manifest and ``latest``, with
    the same atomic protocol. ``ranks`` is a :class:`~meanflow.train.distributed.Ranks`.
    Loading (:meth:`Checkpoint.load_sharded`) works on any number of ranks, including one
    process without a process group.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

    _check_step_and_keep(step, keep)
    for name in sharded:
        if not isinstance(name, str) or not name:
            raise ValueError(f"sharded: invalid name {name!r}")
    # Every rank makes the same collective calls whatever fails where: each stage ends in an
    # agreement, and a failure before the folder is renamed into place leaves nothing behind
    # (``latest`` unchanged).
    folders = error = None
    if ranks.main:
        try:
            folders = _begin(Path(directory), step)
        except Exception as err:  # noqa: BLE001 - re-raised on rank 0 below, reported on the others
            error = err
    folders = ranks.broadcast(folders)
    if folders is None:
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint of step {step}: rank 0 could not create the checkpoint folder")
    final, tmp = folders
    try:
        dcp.save(sharded, checkpoint_id=str(tmp / SHARDED))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - every rank must reach the agreement below
        error = RuntimeError(f"checkpoint of step {step}: writing the shards failed: {err}")
        error.__cause__ = err
    if ranks.all(error is None) and ranks.main:
        try:
            files = sorted(p for p in (tmp / SHARDED).rglob("*") if p.is_file())
            _finish(final, tmp, step, files, state, generators, checksums,
                    {"groups": [], "optimizers": [], "sharded": list(sharded), "ranks": ranks.size}, keep)
        except Exception as err:  # noqa: BLE001
            error = err
    saved = ranks.all(error is None)
    if not saved:
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
        ranks.barrier()  # the failed save is gone on every rank's return
    if error is not None:
        raise error
    if not saved:
        raise RuntimeError(f"checkpoint of step {step}: another rank failed to save it (see its error)")
    return final


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

class Checkpoint:
    """A validated checkpoint folder. Small parts are read at load; tensors on demand.

    Attributes:
        path: the folder.
        step: the saved step.
        state: the trainer state (as saved, tuples and int keys kept).
        rng: the captured RNG states (see :func:`capture_rng`).
        groups: the tensor group names; ``optimizers``: the optimizer names.
    """

    def __init__(self, path: Path, manifest: dict, state: dict, rng: dict):
        self.path = path
        self.manifest = manifest
        self.step: int = manifest["step"]
        self.state = state
        self.rng = rng
        self.groups: tuple[str, ...] = tuple(manifest["groups"])
        self.optimizers: tuple[str, ...] = tuple(manifest["optimizers"])
        self.sharded: tuple[str, ...] = tuple(manifest.get("sharded", ()))

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, step={self.step}, groups={self.groups})"

    def tensors(self, group: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """The tensors of ``group`` (as saved: names, dtypes, shapes) on ``device``."""
        if group not in self.groups:
            raise KeyError(f"group: no tensor group {group!r} in {self.path}; groups: {list(self.groups)}")
        return load_file(str(self.path / f"{group}.safetensors"), device=str(device))

    def optimizer_state(self, name: str, device: str | torch.device = "cpu") -> dict:
        """The state_dict of the optimizer ``name``."""
        if name not in self.optimizers:
            raise KeyError(f"optimizer: no optimizer {name!r} in {self.path}; saved: {list(self.optimizers)}")
        return load_optimizer_state(self.path / f"optimizer.{name}", device)

    def restore_module(self, group: str, module: torch.nn.Module, strict: bool = True):
        """``module.load_state_dict`` of the group's tensors (copied into its dtypes/devices)."""
        return module.load_state_dict(self.tensors(group), strict=strict)

    def restore_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.load_state_dict`` of the saved state (moved to the parameters' devices)."""
        optimizer.load_state_dict(self.optimizer_state(name))

    def load_sharded(self, state_dicts: dict[str, dict]) -> None:
        """Loads the saved shards into ``state_dicts`` (``{name: state_dict}`` shaped like what
        :func:`save_sharded_checkpoint` was given; DTensors on any number of ranks, or plain
        tensors in one process), in place. Every rank calls it."""
        import torch.distributed.checkpoint as dcp

        missing = sorted(set(state_dicts) - set(self.sharded))
        if missing:
            raise KeyError(f"sharded: no sharded state {missing} in {self.path}; saved: {list(self.sharded)}")
        import torch.distributed as dist

        with warnings.catch_warnings():  # one process loading shards is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dicts, checkpoint_id=str(self.path / SHARDED), no_dist=not dist.is_initialized())

    def restore_rng(self, generators: dict[str, torch.Generator] | None = None) -> None:
        """Restores the global RNG states and those of the named ``generators``."""
        restore_rng(self.rng, generators)


def find_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The folder ``directory/latest`` names, or None if there is no ``latest`` (fresh run)."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    return Path(directory) / pointer.read_text(encoding="utf-8").strip()


def _resolve(directory: Path, step: int | None) -> Path:
    if (directory / MANIFEST).is_file() or _folder_step(directory.name) is not None:
        return directory  # a checkpoint folder itself
    if step is not None:
        matches = [p for p in list_checkpoints(directory) if _folder_step(p.name) == step]
        if not matches:
            raise ValueError(f"{directory}: no checkpoint of step {step}")
        return matches[-1]
    pointer = directory / LATEST
    if not pointer.is_file():
        raise ValueError(f"{pointer}: not found (no checkpoint in {directory})")
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{pointer}: unreadable ({err})") from None
    if not name or "/" in name or "\\" in name or _folder_step(name) is None:
        raise ValueError(f"{pointer}: expected the name of a checkpoint folder, got {name!r}")
    folder = directory / name
    if not folder.is_dir():
        raise ValueError(f"{pointer}: names {name!r}, but {folder} does not exist")
    return folder


def _validate(folder: Path, manifest: dict, verify: bool) -> None:
    for fname, info in manifest["files"].items():
        path = folder / fname
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {folder / MANIFEST})")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise ValueError(f"{path}: corrupt: {size} bytes, expected {info['bytes']}")
        if verify and "sha256" in info and _sha256(path) != info["sha256"]:
            raise ValueError(f"{path}: corrupt: sha256 mismatch")
        if fname.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt") as f:
                    list(f.keys())
            except Exception as err:  # safetensors raises its own error type
                raise ValueError(f"{path}: corrupt safetensors file ({err})") from None


def _read(path: Path):
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: corrupt JSON ({err})") from None


def load_checkpoint(directory: str | os.PathLike, step: int | None = None, *,
                    verify: bool = True) -> Checkpoint:
    """The checkpoint ``directory/latest`` names (or of ``step``, or ``directory`` itself if it is
    a checkpoint folder), validated.

    ``verify`` checks recorded sha256 sums (reads every file once). Raises ``ValueError`` naming
    the file for a missing ``latest``, a ``latest`` naming a missing folder, and missing, truncated
    or corrupt files. Reads only.
    """
    folder = _resolve(Path(directory), step)
    manifest = _read(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not {"step", "groups", "optimizers", "files"} <= set(manifest):
        raise ValueError(f"{folder / MANIFEST}: not a format-{FORMAT} checkpoint manifest")
    _validate(folder, manifest, verify)
    state = join_tensors(_read(folder / "state.json"), {})
    rng_tensors = load_file(str(folder / "rng.safetensors"))
    try:
        rng = join_tensors(_read(folder / "rng.json"), rng_tensors)
    except KeyError as err:
        raise ValueError(f"{folder / 'rng.json'}: names a tensor missing from "
                         f"rng.safetensors ({err})") from None
    return Checkpoint(folder, manifest, state, rng)
