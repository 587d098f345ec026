"""Argument checks shared by the fused elementwise / linear JVP ops (ValueErrors naming the argument)."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = TRITON_DTYPES + (torch.float64,)


def check_tensor(name: str, t, dtypes: tuple = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be one of {names}, got {t.dtype}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same dtype and device as ``ref``."""
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_tangent(name: str, tangent, primal: torch.Tensor) -> None:
    """A pair-form tangent: None, or shaped, typed and placed like its primal."""
    if tangent is None:
        return
    if not isinstance(tangent, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(tangent).__name__}")
    if tangent.shape != primal.shape:
        raise ValueError(f"{name} must have the shape of its primal {tuple(primal.shape)}, got {tuple(tangent.shape)}")
    if tangent.dtype != primal.dtype:
        raise ValueError(f"{name} must have the dtype of its primal ({primal.dtype}), got {tangent.dtype}")
    if tangent.device != primal.device:
        raise ValueError(f"{name} must be on {primal.device}, got {tangent.device}")


def has_forward_tangent(t: torch.Tensor | None) -> bool:
    return t is not None and fwAD.unpack_dual(t).tangent is not None


def check_triton_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} is not supported by the Triton backend of {op} "
                         "(float16, bfloat16, float32); use MEANFLOW_BACKEND=reference")


def zeros_if_none(y_dot: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(y) if y_dot is None else y_dot
