"""``alignment_loss``: trajectory distribution alignment's DMD loss (DESIGN §2, TDA steps 4–5).

    D_b = max(mean_j |x̂_bj − x0_teacher,bj|, eps)
    g_b = (x0_fake,b − x0_teacher,b) / D_b
    L_align = (1/B) · Σ_b ½‖x̂_b − sg(x̂_b − g_b)‖²  =  (1/B) · Σ_b ½‖g_b‖²
    dL_align/dx̂ = g / B        (x0_fake, x0_teacher and D get no gradient)

eps guards the denominator where x̂ equals the teacher's clean estimate (default 1e-4: at
latent scale ~1 it caps the normalisation gain at 1e4 and never touches a realistic sample).
One fused pass over the three inputs per sample (Triton, float32 accumulation, deterministic
two-stage reduction) gives Σ|x̂ − x0_teacher| and Σ(x0_fake − x0_teacher)² and stores
x0_fake − x0_teacher; the backward writes grad_output · g / B in one elementwise pass.

Under torch.func transforms (grad, vjp, jvp, vmap) and on a dual x̂ (forward AD), the same loss
runs as plain torch ops, which those transforms differentiate themselves.
"""
from __future__ import annotations

import torch

from meanflow.ops._checks import FLOAT_DTYPES, check_like, check_number, check_tensor, check_triton_dtype
from meanflow.ops.dispatch import implementation, resolve_backend
from meanflow.ops.pair import refuse_double_backward, under_transform

STEM = "alignment_loss"
DEFAULT_EPS = 1e-4


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class AlignmentLoss(torch.autograd.Function):
    """(x̂ (B, N), x0_fake (B, N), x0_teacher (B, N), eps, backend, need_grad) -> (loss, ½‖g_b‖² (B,))."""

    @staticmethod
    def forward(ctx, x_hat, x0_fake, x0_teacher, eps, backend, need_grad):
        impl = implementation(STEM, backend)
        abs_sums, sq_sums, residual = impl.alignment_loss_forward(x_hat, x0_fake, x0_teacher, need_grad)
        dtype = _compute_dtype(x_hat.dtype)
        batch, n_elem = x_hat.shape
        denom = (abs_sums.to(dtype) / n_elem).clamp_min(eps)
        per_sample = 0.5 * sq_sums.to(dtype) / denom.square()
        loss = per_sample.sum() / batch
        ctx.backend = backend
        ctx.save_for_backward(residual, 1.0 / (batch * denom) if need_grad else None)
        ctx.mark_non_differentiable(per_sample)
        return loss, per_sample

    @staticmethod
    def backward(ctx, grad_loss, grad_per_sample):
        residual, row_scale = ctx.saved_tensors
        # The residual was saved without its graph: dx would carry none.
        refuse_double_backward(STEM, grad_loss, residual, row_scale)
        grad_x = None
        if ctx.needs_input_grad[0] and residual is not None:
            grad_x = implementation(STEM, ctx.backend).alignment_loss_backward(
                residual, row_scale * grad_loss.to(row_scale.dtype))
        return grad_x, None, None, None, None, None


def _direction(x, f, t, eps):
    """(g (B, N), D (B,)) in plain torch from (B, N) x̂, x0_fake, x0_teacher in the compute dtype:
    D_b = max(mean_j |x̂ − x0_teacher|, eps), g = (x0_fake − x0_teacher) / D_b."""
    denom = (x - t).abs().mean(dim=1).clamp_min(eps)
    return (f - t) / denom[:, None], denom


# The Function as Python runs it, never traced by Dynamo (under torch.compile the formula runs
# instead, ``under_transform``; after a graph break the frames below would be compiled one by one).
_apply_untraced = torch.compiler.disable(AlignmentLoss.apply)


def _formula(x_hat, x0_fake, x0_teacher, eps):
    """The loss as plain torch ops, with the Function's numerics, for transforms: the value
    (1/B)·Σ½‖g_b‖² plus (x̂ − sg(x̂))·g / B, which is zero and gives x̂ the gradient g / B."""
    dtype = _compute_dtype(x_hat.dtype)
    x, f, t = x_hat.to(dtype), x0_fake.to(dtype), x0_teacher.to(dtype)
    g, denom = _direction(x.detach(), f, t, eps)
    per_sample = 0.5 * (f - t).square().sum(1) / denom.square()
    return (per_sample.sum() + ((x - x.detach()) * g).sum()) / x.shape[0], per_sample.detach()


def _check_inputs(x_hat, x0_fake, x0_teacher, eps) -> float:
    """The checks both entry points share; returns eps as a float."""
    check_tensor("x_hat", x_hat, FLOAT_DTYPES)
    check_tensor("x0_fake", x0_fake, FLOAT_DTYPES)
    check_tensor("x0_teacher", x0_teacher, FLOAT_DTYPES)
    if x_hat.dim() < 1 or x_hat.shape[0] == 0 or x_hat[0].numel() == 0:
        raise ValueError(f"x_hat must be (B, ...) with B >= 1 and at least one element per sample, "
                         f"got shape {tuple(x_hat.shape)}")
    for name, t in (("x0_fake", x0_fake), ("x0_teacher", x0_teacher)):
        if t.shape != x_hat.shape:
            raise ValueError(f"{name} must have x_hat's shape {tuple(x_hat.shape)}, got {tuple(t.shape)}")
        check_like(name, t, "x_hat", x_hat)
    return check_number("eps", eps, positive=True)


def _validate(x_hat, x0_fake, x0_teacher, eps) -> str:
    _check_inputs(x_hat, x0_fake, x0_teacher, eps)
    backend = resolve_backend(x_hat.device)
    if backend == "triton":
        check_triton_dtype(STEM, "x_hat", x_hat)
    return backend


def alignment_loss(
    x_hat: torch.Tensor,
    x0_fake: torch.Tensor,
    x0_teacher: torch.Tensor,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_align = mean_b ½‖x̂_b − sg(x̂_b − g_b)‖², g_b = (x0_fake − x0_teacher)_b / D_b,
    D_b = max(mean|x̂ − x0_teacher|_b, eps).

    Args:
        x_hat: (B, ...) the student's clean estimate (the only input that gets a gradient:
            exactly g / B); float16 / bfloat16 / float32 (float64 on the reference backend).
        x0_fake: the fake velocity net's clean estimate at the re-noised point; x_hat's shape,
            dtype and device.
        x0_teacher: the guided teacher's clean estimate there; likewise.
        eps: floor of the per-sample denominator (a finite number > 0).

    Returns:
        (loss, per_sample): the scalar loss and ½‖g_b‖² (B,) for logging (no gradient), float32
        (float64 for float64 input).
    """
    backend = _validate(x_hat, x0_fake, x0_teacher, eps)
    x2 = x_hat.reshape(x_hat.shape[0], -1)
    f2, t2 = x0_fake.detach().reshape(x2.shape), x0_teacher.detach().reshape(x2.shape)
    if under_transform(x_hat):
        return _formula(x2, f2, t2, float(eps))
    need_grad = torch.is_grad_enabled() and x_hat.requires_grad
    return _apply_untraced(x2, f2, t2, float(eps), backend, need_grad)


def alignment_direction(
    x_hat: torch.Tensor, x0_fake: torch.Tensor, x0_teacher: torch.Tensor, eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """g itself in plain torch (no gradient), for logging and tests: (x0_fake − x0_teacher) / D_b.

    Args: as ``alignment_loss`` (any backend; float64 always works).

    Returns:
        x_hat's shape, float32 (float64 for float64 input); D_b is taken per sample b over all
        of that sample's elements (a 1-D x_hat is B samples of one element each).
    """
    eps = _check_inputs(x_hat, x0_fake, x0_teacher, eps)
    dtype = _compute_dtype(x_hat.dtype)
    x, f, t = (a.detach().to(dtype).reshape(x_hat.shape[0], -1) for a in (x_hat, x0_fake, x0_teacher))
    return _direction(x, f, t, eps)[0].reshape(x_hat.shape)
