"""Exponential moving average of a module's parameters (the student's EMA).

``EMA(module, decay)`` keeps a float32 shadow of every trainable parameter (whatever the
module's dtype, e.g. bf16 parameters get an fp32 average; frozen ones, such as the weights under
adapters, never move and are their own average) and a copy of every buffer (in its dtype).
``update(module)`` does shadow ← d·shadow + (1 − d)·param for each parameter, with
d = decay, or d = min(decay, (1 + n)/(10 + n)) with ``warmup=True`` (n = updates so far), and
copies the buffers. ``copy_to(module)`` writes the average into a module (cast to its dtypes).
``state_dict()`` is a flat ``{name: tensor}`` (``params.<name>``, ``buffers.<name>`` and the
0-d int64 ``num_updates``), so it can be a :func:`~meanflow.train.checkpoint.save_checkpoint`
tensor group; ``load_state_dict`` restores it bit-exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """The EMA of ``module``'s parameters.

    Args:
        module: the module to average (its parameter/buffer names define the state).
        decay: d in [0, 1) (e.g. 0.999).
        warmup: use d_n = min(decay, (1 + n)/(10 + n)) for the n-th update (default False).
        device: where the shadow lives (default: each parameter's device; e.g. ``"cpu"`` to
            save accelerator memory at the cost of a transfer per update).
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False,
                 device: str | torch.device | None = None):
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        with torch.no_grad():
            self.params: dict[str, Tensor] = {
                name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                for name, p in module.named_parameters() if p.requires_grad}
            self.buffers: dict[str, Tensor] = {
                name: b.detach().to(device=device or b.device, copy=True)
                for name, b in module.named_buffers()}

    def current_decay(self) -> float:
        """The d the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step towards ``module``'s current parameters (which must match by name)."""
        d = self.current_decay()
        params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        if params.keys() != self.params.keys():
            raise ValueError(f"module: trainable parameter names differ from the EMA's "
                             f"({sorted(params.keys() ^ self.params.keys())[:5]} ...)")
        for name, shadow in self.params.items():
            p = params[name].detach().to(device=shadow.device, dtype=torch.float32)
            shadow.mul_(d).add_(p, alpha=1.0 - d)
        for name, b in module.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Writes the averaged parameters (and buffers) into ``module``, in its dtypes/devices."""
        params = dict(module.named_parameters())
        for name, shadow in self.params.items():
            params[name].copy_(shadow)
        buffers = dict(module.named_buffers())
        for name, b in self.buffers.items():
            buffers[name].copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """``{"params.<name>": fp32, "buffers.<name>": tensor, "num_updates": int64 0-d}`` (no copies)."""
        state = {f"params.{k}": v for k, v in self.params.items()}
        state.update({f"buffers.{k}": v for k, v in self.buffers.items()})
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restores :meth:`state_dict` exactly (keys must match; values copied in place)."""
        expected = {f"params.{k}" for k in self.params} | {f"buffers.{k}" for k in self.buffers} \
            | {"num_updates"}
        if set(state) != expected:
            diff = sorted(set(state) ^ expected)
            more = " ..." if len(diff) > 5 else ""
            raise ValueError(f"state: keys differ from this EMA's: {diff[:5]}{more}")
        for k, v in self.params.items():
            v.copy_(state[f"params.{k}"])
        for k, v in self.buffers.items():
            v.copy_(state[f"buffers.{k}"])
        self.num_updates = int(state["num_updates"])
