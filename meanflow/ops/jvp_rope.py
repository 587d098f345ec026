"""``jvp_rope``: FLUX's rotary embedding with its tangent computed outside autograd.

Exactly diffusers' ``apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)``
as ``FluxAttnProcessor`` calls it, on interleaved pairs (x[2i], x[2i+1]):

    y = x·cos + rot(x)·sin,   rot(x)[2i] = −x[2i+1],  rot(x)[2i+1] = x[2i]   (float32 arithmetic)

The rotation does not depend on t, so ẏ = ẋ·cos + rot(ẋ)·sin; one Triton pass computes both.
cos and sin are constants: they may not require grad nor carry a tangent. The output is a
contiguous (B, H, N, D) tensor whatever x's strides (FLUX passes a transposed view).
"""
from __future__ import annotations

import torch

from meanflow.ops._checks import (FLOAT_DTYPES, check_same_device, check_tangent, check_tensor,
                                  check_triton_dtype, has_forward_tangent, zeros_if_none)
from meanflow.ops.dispatch import implementation, resolve_backend
from meanflow.ops.pair import KERNEL_OP, PairOp, apply_pair, backward_backend


def _forward(inputs, tangents, options):
    x, cos, sin = inputs
    (backend,) = options
    y, y_dot = implementation("jvp_rope", backend).jvp_rope_forward(x, tangents[0], cos, sin)
    return y, y_dot, ()


def _backward(inputs, y, extras, options, grad_y, needs_input_grad):
    x, cos, sin = inputs
    (backend,) = options
    if not needs_input_grad[0]:
        return None, None, None
    impl = implementation("jvp_rope", backward_backend(backend))
    dx = impl.jvp_rope_backward(grad_y, cos, sin)
    return dx, None, None


# Inputs (x, cos, sin): x (B, H, N, D), cos/sin (N, D). Options (backend,). Output (B, H, N, D).
JVP_ROPE = PairOp("jvp_rope", _forward, _backward, input_names=("x", "cos", "sin"), **KERNEL_OP)


def _validate(x, cos, sin):
    """Returns (backend, cos, sin) with cos/sin as the backend reads them."""
    check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, N, D), got shape {tuple(x.shape)}")
    n, d = x.shape[2], x.shape[3]
    if d % 2:
        raise ValueError(f"x's head dim must be even (pairs x[2i], x[2i+1] are rotated), got {d}")
    for name, f in (("cos", cos), ("sin", sin)):
        check_tensor(name, f, FLOAT_DTYPES)
        if f.shape != (n, d):
            raise ValueError(f"{name} must be (N, D) = ({n}, {d}) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(f.shape)}")
        check_same_device(name, f, "x", x)
        if f.requires_grad:
            raise ValueError(f"{name} requires grad: gradients to the rotary tables are not supported")
        if has_forward_tangent(f):
            raise ValueError(f"{name} has a forward-AD tangent: the rotation must not depend on the "
                             "differentiated variable")
    backend = "reference" if x.numel() == 0 else resolve_backend(x.device)
    if backend == "triton":
        check_triton_dtype("jvp_rope", "x", x)
        # The kernel reads the tables in float32 at most (FLUX's are float32 already).
        cos, sin = (f.float() if f.dtype == torch.float64 else f for f in (cos, sin))
    return backend, cos, sin


def jvp_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding, usable under ``torch.func.jvp`` / forward AD.

    Args:
        x: (B, H, N, D) queries or keys, D even; float16 / bfloat16 / float32 (float64 on the
            reference backend); any strides.
        cos, sin: (N, D) tables as diffusers' ``FluxPosEmbed`` returns them (float32); no
            gradient, no tangent.

    Returns:
        (B, H, N, D) contiguous in x's dtype, equal to diffusers' ``apply_rotary_emb``; its
        forward-AD tangent (the same rotation of ẋ) has no ``grad_fn``.
    """
    backend, cos, sin = _validate(x, cos, sin)
    y, _ = apply_pair(JVP_ROPE, (x, cos, sin), None, (backend,))
    return y


def jvp_rope_pair(
    x: torch.Tensor, x_dot: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ): y differentiable to x, ẏ the same rotation of x_dot, detached (zeros if None)."""
    check_tensor("x", x, FLOAT_DTYPES)
    check_tangent("x_dot", x_dot, x)
    backend, cos, sin = _validate(x, cos, sin)
    y, y_dot = apply_pair(JVP_ROPE, (x, cos, sin), (x_dot, None, None), (backend,))
    return y, zeros_if_none(y_dot, y)
