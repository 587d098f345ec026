"""Capture and restore every random stream a training run uses.

:func:`capture_rng` returns a dict: ``"torch"`` (the CPU default generator's state, a uint8
tensor), ``"cuda"`` (a list of per-device uint8 state tensors; empty without CUDA),
``"python"`` (``random.getstate()``), ``"numpy"`` (``numpy.random.get_state()`` as plain
types; None without numpy) and ``"generators"`` (``{name: uint8 state tensor}`` of the named
``torch.Generator`` objects the caller passes, CPU or CUDA). :func:`restore_rng` puts them
back. The dict goes through :mod:`meanflow.train.codec`, so it can be saved to
safetensors + JSON exactly.
"""
from __future__ import annotations

import random

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a dependency, but keep RNG capture working
    np = None

__all__ = ["capture_rng", "restore_rng"]


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """The state of all global random streams and of the named ``generators`` (copies)."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": None,
        "generators": {name: g.get_state().clone() for name, g in (generators or {}).items()},
    }
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Restores what :func:`capture_rng` captured.

    Every name in ``generators`` must be in the captured state (ValueError naming it otherwise);
    captured generators not passed are ignored. CUDA states are restored on as many devices as
    both the capture and this machine have.
    """
    for name in generators or {}:
        if name not in state.get("generators", {}):
            raise ValueError(f"generators: no captured state for the generator {name!r}; "
                             f"captured: {sorted(state.get('generators', {}))}")
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), i)
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if np is not None and state.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name].to("cpu", torch.uint8))
