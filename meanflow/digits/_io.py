"""Saving and loading the digits world's modules: one safetensors file of prefixed state dicts
with JSON configs in its metadata."""
from __future__ import annotations

import json
import os

__all__ = ["ASSETS", "save_modules", "load_state"]

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


def save_modules(path: str | os.PathLike, modules: dict, configs: dict, extra: dict | None = None) -> None:
    """Writes ``{prefix.name: tensor}`` for every ``prefix -> module`` in ``modules`` to ``path``,
    each ``configs[prefix]`` as the JSON metadata entry ``prefix + "_config"``, and ``extra``
    entries (JSON-encoded) as further metadata. Tensors are stored contiguous on the CPU."""
    from safetensors.torch import save_file

    state = {}
    for prefix, module in modules.items():
        for k, v in module.state_dict().items():
            state[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    meta = {"format": "pt"}
    meta.update({f"{prefix}_config": json.dumps(cfg) for prefix, cfg in configs.items()})
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_state(path: str | os.PathLike, prefixes: tuple[str, ...]) -> tuple[dict, dict]:
    """Reads a file :func:`save_modules` wrote: ({prefix: state dict}, {prefix: config}).

    Raises ``ValueError`` naming ``path`` if the file is missing or lacks a prefix."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"path: no file at {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    states, configs = {}, {}
    for prefix in prefixes:
        key = f"{prefix}_config"
        if key not in meta:
            raise ValueError(f"path: {str(path)!r} has no {key!r} metadata (not a meanflow.digits file)")
        configs[prefix] = json.loads(meta[key])
        states[prefix] = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return states, configs
