"""``jvp_gelu_tanh`` and ``jvp_silu``: activations whose tangent is computed outside autograd.

    gelu_tanh: y = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))   (F.gelu(x, approximate="tanh"))
    silu:      y = x·σ(x)                                   (F.silu(x))
    ẏ = f'(x)·ẋ,   backward dx = f'(x)·g

One Triton elementwise kernel (activation and tangent selected by constexprs, arithmetic in
float32) computes y and ẏ in one pass; the backward is the same kernel with g in place of ẋ
and no primal output. The tangent carries no ``grad_fn``.
"""
from __future__ import annotations

import torch

from meanflow.ops._checks import FLOAT_DTYPES, check_tangent, check_tensor, check_triton_dtype, zeros_if_none
from meanflow.ops.dispatch import implementation, resolve_backend
from meanflow.ops.pair import KERNEL_OP, PairOp, apply_pair, backward_backend


def _forward(inputs, tangents, options):
    kind, backend = options
    y, y_dot = implementation("jvp_activation", backend).jvp_activation_forward(inputs[0], tangents[0], kind)
    return y, y_dot, ()


def _backward(inputs, y, extras, options, grad_y, needs_input_grad):
    kind, backend = options
    if not needs_input_grad[0]:
        return (None,)
    impl = implementation("jvp_activation", backward_backend(backend))
    return (impl.jvp_activation_backward(grad_y, inputs[0], kind),)


# Input (x,), any shape and strides. Options (kind, backend). Nothing saved but x.
JVP_GELU_TANH = PairOp("jvp_gelu_tanh", _forward, _backward, input_names=("x",), **KERNEL_OP)
JVP_SILU = PairOp("jvp_silu", _forward, _backward, input_names=("x",), **KERNEL_OP)
_OPS = {"gelu_tanh": JVP_GELU_TANH, "silu": JVP_SILU}


def _validate(name: str, x) -> str:
    check_tensor("x", x, FLOAT_DTYPES)
    backend = "reference" if x.numel() == 0 else resolve_backend(x.device)
    if backend == "triton":
        check_triton_dtype(name, "x", x)
    return backend


def _apply(kind: str, x: torch.Tensor) -> torch.Tensor:
    backend = _validate(f"jvp_{kind}", x)
    y, _ = apply_pair(_OPS[kind], (x,), None, (kind, backend))
    return y


def _apply_pair(kind: str, x: torch.Tensor, x_dot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("x", x, FLOAT_DTYPES)
    check_tangent("x_dot", x_dot, x)
    backend = _validate(f"jvp_{kind}", x)
    y, y_dot = apply_pair(_OPS[kind], (x,), (x_dot,), (kind, backend))
    return y, zeros_if_none(y_dot, y)


def jvp_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` that works under ``torch.func.jvp`` / forward AD.

    Args:
        x: any shape; float16 / bfloat16 / float32 (float64 on the reference backend).

    Returns:
        x's shape and dtype; its forward-AD tangent has no ``grad_fn``.
    """
    return _apply("gelu_tanh", x)


def jvp_gelu_tanh_pair(x: torch.Tensor, x_dot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ): y differentiable to x, ẏ = gelu_tanh'(x)·ẋ detached (zeros if x_dot is None)."""
    return _apply_pair("gelu_tanh", x, x_dot)


def jvp_silu(x: torch.Tensor) -> torch.Tensor:
    """``F.silu(x)`` that works under ``torch.func.jvp`` / forward AD (see ``jvp_gelu_tanh``)."""
    return _apply("silu", x)


def jvp_silu_pair(x: torch.Tensor, x_dot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ): y differentiable to x, ẏ = silu'(x)·ẋ detached (zeros if x_dot is None)."""
    return _apply_pair("silu", x, x_dot)
