"""Argument checks shared by the fused JVP ops and the losses (ValueErrors naming the argument),
and the autocast rule of the ops that autocast (linear, attention)."""
from __future__ import annotations

import math
import numbers

import torch
import torch.autograd.forward_ad as fwAD

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = TRITON_DTYPES + (torch.float64,)


def check_tensor(name: str, t, dtypes: tuple = FLOAT_DTYPES) -> None:
    """A dense (strided) tensor of one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be one of {names}, got {t.dtype}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same dtype and device as ``ref``."""
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    check_same_device(name, t, ref_name, ref)


def check_tangent(name: str, tangent, primal: torch.Tensor | None, primal_name: str = "its primal") -> None:
    """A tangent: None, or a dense tensor shaped, typed and placed like its primal."""
    if tangent is None:
        return
    if primal is None:
        raise ValueError(f"{name} is given but {primal_name} is None")
    if not isinstance(tangent, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(tangent).__name__}")
    if tangent.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {tangent.layout}")
    if tangent.shape != primal.shape:
        raise ValueError(f"{name} must have the shape of {primal_name} {tuple(primal.shape)}, "
                         f"got {tuple(tangent.shape)}")
    if tangent.dtype != primal.dtype:
        raise ValueError(f"{name} must have the dtype of {primal_name} ({primal.dtype}), got {tangent.dtype}")
    check_same_device(name, tangent, primal_name, primal)


def check_number(name: str, value, *, positive: bool) -> float:
    """A finite real number (a bool is refused), > 0 if ``positive`` else >= 0."""
    bound = "> 0" if positive else ">= 0"
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def has_forward_tangent(t: torch.Tensor | None) -> bool:
    return t is not None and fwAD.unpack_dual(t).tangent is not None


def check_triton_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} is not supported by the Triton backend of {op} "
                         "(float16, bfloat16, float32); use MEANFLOW_BACKEND=reference")


def autocast(*tensors):
    """The tensors as torch's autocast hands them to its lower-precision ops (``F.linear``, SDPA):
    float16 / bfloat16 / float32 ones cast to the autocast dtype, float64 and the rest unchanged."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    device = None if first is None else first.device.type
    if device not in ("cuda", "cpu") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in TRITON_DTYPES else t
                 for t in tensors)


def unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with unit stride on its last dim (a copy only where it has not): the kernels read rows
    contiguously, with any stride between them."""
    if t is None or t.numel() == 0 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def zeros_if_none(y_dot: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(y) if y_dot is None else y_dot
