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
import warnings

import torch
from torch import Tensor, nn

from meanflow.models.flux import FUSED_PROJECTIONS


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

    def __getattr__(self, name: str):
        if name == "weight":
            # An AttributeError (hasattr() stays False), with the reason: code that reads a plain
            # Linear's weight, as diffusers' fuse_qkv_projections() does, would otherwise lose
            # the update.
            raise AttributeError("a LoRALinear has no plain weight (it is base.weight plus the "
                                 "adapters' update; merged_weight() gives their sum): fuse projections "
                                 "(fuse_qkv_projections()) before adding adapters, not after")
        return super().__getattr__(name)

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
    """Freezes ``transformer`` and replaces every layer :func:`lora_targets` names by a
    :class:`LoRALinear` of the given rank and α (in place), A drawn from ``generator`` (CPU;
    default torch's global one).

    Raises:
        ValueError: as :func:`lora_targets`, or a bad ``alpha``; nothing is frozen or replaced then.

    Returns:
        the qualified names of the adapted layers (relative to ``transformer``).
    """
    check_rank_alpha(rank, alpha)
    targets = lora_targets(transformer, rank)
    transformer.requires_grad_(False)
    for _, parent, child, module in targets:
        setattr(parent, child, LoRALinear(module, rank, alpha, generator))
    return [name for name, *_ in targets]


def lora_targets(transformer: nn.Module, rank: int) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """The layers that adapters of ``rank`` go on: every ``nn.Linear`` inside ``transformer``'s
    double and single blocks, as (qualified name, parent module, attribute name, Linear). In an
    attention layer whose projections are fused (``fuse_qkv_projections()``), the fused
    ``to_qkv`` / ``to_added_qkv`` count and the unfused q, k, v layers, which its forward no
    longer reads, do not.

    Raises:
        ValueError: ``rank`` wider than one of them, blocks that already carry adapters, or no
            Linear at all.
    """
    targets = []
    for prefix, block_list in (("transformer_blocks", transformer.transformer_blocks),
                               ("single_transformer_blocks", transformer.single_transformer_blocks)):
        for index, block in enumerate(block_list):
            if any(isinstance(m, LoRALinear) for m in block.modules()):
                raise ValueError(f"transformer: {prefix}.{index} already carries adapters")
            unread = _unread_projections(block)
            for name, module in block.named_modules():
                if type(module) is not nn.Linear or id(module) in unread:
                    continue
                if rank > min(module.in_features, module.out_features):
                    raise ValueError(f"rank: {rank} exceeds min(in_features, out_features) = "
                                     f"{min(module.in_features, module.out_features)} of {prefix}.{index}.{name}")
                parent_name, _, child = name.rpartition(".")
                targets.append((f"{prefix}.{index}.{name}", block.get_submodule(parent_name) if parent_name else block,
                                child, module))
    if not targets:
        raise ValueError("transformer: no torch.nn.Linear inside its blocks to adapt")
    return targets


def _unread_projections(block: nn.Module) -> set[int]:
    """ids of the q, k, v Linears that fused attention layers in ``block`` keep but do not read."""
    unread = set()
    for attn in block.modules():
        if not getattr(attn, "fused_projections", False):
            continue
        for fused, parts in FUSED_PROJECTIONS.items():
            if getattr(attn, fused, None) is not None:
                unread.update(id(getattr(attn, part)) for part in parts if getattr(attn, part, None) is not None)
    return unread


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
    pass unchanged.

    Over a 16-bit W the rounding can drop much of an update smaller than W's rounding step (the
    reason the factors train in float32): a warning names how many layers lost more than
    ``LOST_UPDATE_WARNING`` of their update's norm."""
    merged = dict(state)
    lost = []
    for name, scaling in scalings.items():
        weight = merged.pop(f"{name}.base.weight")
        down, up = merged.pop(f"{name}.lora_down"), merged.pop(f"{name}.lora_up")
        dtype = torch.promote_types(down.dtype, torch.float32)
        delta = (up.to(dtype) @ down.to(dtype)) * scaling
        base = weight.to(dtype)
        merged[f"{name}.weight"] = (base + delta).to(weight.dtype)
        if weight.dtype.itemsize < 4 and weight.device.type != "meta":
            kept = merged[f"{name}.weight"].to(dtype) - base
            size = torch.linalg.vector_norm(delta)
            if size > 0:
                lost.append(float(torch.linalg.vector_norm(kept - delta) / size))
        if f"{name}.base.bias" in merged:
            merged[f"{name}.bias"] = merged.pop(f"{name}.base.bias")
    if lost and max(lost) > LOST_UPDATE_WARNING:
        count = sum(x > LOST_UPDATE_WARNING for x in lost)
        warnings.warn(f"merging adapters into 16-bit weights: {count} of {len(lost)} layers lost more than "
                      f"{LOST_UPDATE_WARNING:.0%} of their update to rounding (worst {max(lost):.0%}); "
                      "a float32 base keeps the update whole", stacklevel=2)
    return merged


LOST_UPDATE_WARNING = 0.1
