"""Nested Python state <-> (JSON-able structure, flat dict of tensors), exactly.

Optimizer state dicts, RNG states and trainer state mix tensors with ints, floats, tuples,
int-keyed dicts and None. :func:`split_tensors` turns such a structure into a JSON-serialisable
structure plus a flat ``dict[str, Tensor]`` (for safetensors); :func:`join_tensors` inverts it
exactly: same Python types (tuples stay tuples, int keys stay ints), same tensor dtypes, shapes
and bits. Tensors come back as stored (CPU unless loaded elsewhere); they are detached,
contiguous CPU copies on the way out (views of shared storage are cloned so safetensors accepts
them).

Encoding: a tensor -> ``{"__tensor__": key}``, a tuple -> ``{"__tuple__": [...]}``, a dict whose
keys are not all plain strings -> ``{"__dict__": [[key, value], ...]}``. Floats survive JSON
bit-exactly (Python writes the shortest round-tripping repr; NaN/Infinity included).

Also :func:`save_optimizer` / :func:`load_optimizer_state` (an optimizer's state_dict through
safetensors + JSON) and :func:`write_json` / :func:`read_json`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["split_tensors", "join_tensors", "save_tensors", "write_json", "read_json",
           "save_optimizer", "load_optimizer_state"]

_MARKERS = ("__tensor__", "__tuple__", "__dict__")


def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """(JSON-able structure, {key: tensor}) for ``obj``; TypeError naming the path otherwise."""
    tensors: dict[str, Tensor] = {}

    def enc(x, path: str):
        if isinstance(x, Tensor):
            key = path or "tensor"
            while key in tensors:
                key += "_"
            tensors[key] = x
            return {"__tensor__": key}
        if isinstance(x, (bool, int, float, str)) or x is None:
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not any(k in _MARKERS for k in x):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {"__dict__": [[enc(k, f"{path}.key"), enc(v, f"{path}.{k}")] for k, v in x.items()]}
        raise TypeError(f"{path.lstrip('.') or 'state'}: cannot store a {type(x).__name__} "
                        f"(expected tensors, numbers, strings, None, lists, tuples, dicts)")

    return enc(obj, prefix), tensors


def join_tensors(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`split_tensors` (KeyError naming the key if a tensor is missing)."""
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__dict__"}:
            return {_hashable(join_tensors(k, tensors)): join_tensors(v, tensors) for k, v in obj["__dict__"]}
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Writes ``tensors`` to a safetensors file (detached contiguous CPU copies; shared storage cloned)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ident is not None and (ident in seen or t.untyped_storage().nbytes() != t.nbytes):
            t = t.clone()
        if ident is not None:
            seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[key] = t
    save_file(out, str(path))


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Writes a JSON-able structure to ``path`` (UTF-8; NaN/Infinity allowed)."""
    Path(path).write_text(json.dumps(obj, indent=1), encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_optimizer(optimizer_or_state: torch.optim.Optimizer | dict,
                   path_stem: str | os.PathLike) -> list[Path]:
    """Writes an optimizer's state_dict as ``<stem>.safetensors`` (tensors) + ``<stem>.json``.

    Exact for torch.optim optimizers (AdamW's exp_avg / exp_avg_sq / step keep their dtypes and
    bits; param_groups keep tuples such as betas). Returns the two paths.
    """
    state = optimizer_or_state.state_dict() if hasattr(optimizer_or_state, "state_dict") \
        else optimizer_or_state
    structure, tensors = split_tensors(state)
    stem = Path(path_stem)
    st, js = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    save_tensors(tensors, st)
    write_json(structure, js)
    return [st, js]


def load_optimizer_state(path_stem: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """The state_dict written by :func:`save_optimizer` (pass it to ``optimizer.load_state_dict``)."""
    stem = Path(path_stem)
    tensors = load_file(str(stem.with_name(stem.name + ".safetensors")), device=str(device))
    return join_tensors(read_json(stem.with_name(stem.name + ".json")), tensors)
