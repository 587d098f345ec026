"""Low-rank adapters (LoRA) for the student and the fake velocity network.

The fake network v_φ starts as a copy of the teacher (DESIGN §2, TDA step 6). Trained in full,
it costs float32 weights, gradients and two AdamW moments for every teacher parameter: 16 bytes
per parameter, 190 GB for FLUX.1-dev's 12B. With adapters only the copy's weights stay (frozen),
and each adapted Linear learns a low-rank update:

    y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ,    A (r, in), B (out, r)

A starts random (Kaiming-uniform, as is usual for LoRA) and B at zero, so at the start the fake
equals the teacher exactly. Gradients, moments and the optimizer then cover r·(in + out) numbers
per Linear instead of in·out.

Only ``torch.nn.Linear`` layers inside the transformer blocks are adapted (attention
projections, the MLPs and the blocks' modulation layers); the embedders and the final layer stay
frozen at the teacher's values. The student's pair-mode forward carries the adapters' tangent
too (ẏ = ẋ·Wᵀ + (α/r)·(ẋ·Aᵀ)·Bᵀ: W, A and B do not depend on t). :func:`merge_lora_state_dict`
folds the adapters into plain weights, for an exported student that diffusers and
``FluxStudent.from_pretrained`` load as it is.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the Linear to adapt (in_features → out_features); owned, and frozen here.
        rank: r ≥ 1, the update's rank (at most min(in_features, out_features)).
        alpha: the update's scale numerator: the update is multiplied by α / r (> 0).
        generator: draws A's initial values (default: torch's global generator).

    Attributes:
        base: the frozen Linear. ``lora_down`` (r, in) and ``lora_up`` (out, r): the trainable
        factors A and B, float32 (or the base's dtype when that is float64).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if type(base) is not nn.Linear:
            raise ValueError(f"base: expected a torch.nn.Linear, got {type(base).__name__}")
        check_rank_alpha(rank, alpha)
        if rank > min(base.in_features, base.out_features):
            raise ValueError(f"rank: {rank} exceeds min(in_features, out_features) = "
                             f"{min(base.in_features, base.out_features)} of the adapted Linear")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        # float32 factors over a 16-bit base: their updates are too small for bf16 to hold.
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        device = base.weight.device
        down = torch.empty(rank, base.in_features, dtype=dtype)
        if device.type != "meta":  # drawn on the CPU: the same values on every device
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.lora_down = nn.Parameter(down.to(device))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) → (..., out), in the dtype the base Linear gives (autocast's, under
        autocast)."""
        y = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):  # (autocast casts x at the Linear itself)
            x = x.to(self.lora_down.dtype)
        update = nn.functional.linear(nn.functional.linear(x, self.lora_down), self.lora_up)
        return y + (update * self.scaling).to(y.dtype)

    def merged_weight(self) -> Tensor:
        """W + (α/r)·B·A: (out, in), in the base weight's dtype; the Linear this layer equals."""
        delta = (self.lora_up @ self.lora_down) * self.scaling
        return (self.base.weight.to(delta.dtype) + delta).to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def check_rank_alpha(rank, alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or alpha <= 0:
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")


def add_lora_to_flux_blocks(transformer: nn.Module, rank: int, alpha: float,
                            generator: torch.Generator | None = None) -> list[str]:
    """Freezes ``transformer`` and replaces every ``nn.Linear`` inside its double and single
    blocks by a :class:`LoRALinear` of the given rank and α (in place), A drawn from
    ``generator`` (CPU; default torch's global one). Layers narrower than ``rank`` are refused
    with a ValueError naming ``rank``.

    Returns:
        the qualified names of the adapted layers (relative to ``transformer``).
    """
    check_rank_alpha(rank, alpha)
    blocks = [("transformer_blocks", transformer.transformer_blocks),
              ("single_transformer_blocks", transformer.single_transformer_blocks)]
    transformer.requires_grad_(False)
    adapted = []
    for prefix, block_list in blocks:
        for index, block in enumerate(block_list):
            targets = [(name, module) for name, module in block.named_modules() if type(module) is nn.Linear]
            for name, module in targets:
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, LoRALinear(module, rank, alpha, generator))
                adapted.append(f"{prefix}.{index}.{name}")
    if not adapted:
        raise ValueError("transformer: no torch.nn.Linear inside its blocks to adapt")
    return adapted


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' factors inside ``module`` (A and B of every :class:`LoRALinear`)."""
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_down, m.lora_up)]


def lora_scalings(module: nn.Module) -> dict[str, float]:
    """``{qualified name: α/r}`` of every :class:`LoRALinear` inside ``module``."""
    return {name: m.scaling for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def merge_lora_state_dict(state: dict[str, Tensor], scalings: dict[str, float]) -> dict[str, Tensor]:
    """A state dict of a module with adapters, as the same module without them: for each adapted
    layer ``name`` (a key of ``scalings``, as :func:`lora_scalings` gives), ``name.weight`` =
    W + (α/r)·B·A (computed in float32 or float64, stored in W's dtype) and ``name.bias`` the
    base's, in place of ``name.base.*``, ``name.lora_down`` and ``name.lora_up``. Other keys
    pass unchanged."""
    merged = dict(state)
    for name, scaling in scalings.items():
        weight = merged.pop(f"{name}.base.weight")
        down, up = merged.pop(f"{name}.lora_down"), merged.pop(f"{name}.lora_up")
        dtype = torch.promote_types(down.dtype, torch.float32)
        delta = (up.to(dtype) @ down.to(dtype)) * scaling
        merged[f"{name}.weight"] = (weight.to(dtype) + delta).to(weight.dtype)
        if f"{name}.base.bias" in merged:
            merged[f"{name}.bias"] = merged.pop(f"{name}.base.bias")
    return merged
