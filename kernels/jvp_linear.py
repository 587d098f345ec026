"""``jvp_linear`` on CUDA: the primal and tangent rows as ONE cuBLAS GEMM.

    [y; ẏ] = [x; ẋ] Wᵀ        then  y += b,   ẏ += x Ẇᵀ + ḃ  (parameter tangents, rare)

There is no Triton GEMM here on purpose: cuBLAS is the kernel, and a Triton GEMM would lose
to it. What this module decides is the layout:

- x and ẋ are stacked into one (2M, Din) buffer (one copy) and multiplied by Wᵀ once: W is
  read once and the GEMM is twice as tall, which helps when M is small.
- y must not share storage with ẏ: downstream ops save y for backward, and a y that is a view
  of the stacked output would pin the tangent rows until backward, the very memory pair mode
  saves. So y is written to its own buffer by the bias add (``torch.add(rows, b)``, the pass
  the bias needs anyway; a copy without bias), while ẏ stays a view of the GEMM output and
  frees it when the tangent is dropped.

Backward (from the saved x, no recompute): dx = g W, dW = gᵀ x, db = Σ g, in cuBLAS.
Launchers take (..., Din) inputs with any layout and return contiguous outputs; no autograd.
"""
from __future__ import annotations

import torch


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def jvp_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_dot: torch.Tensor | None = None,
    weight_dot: torch.Tensor | None = None,
    bias_dot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, ẏ) of y = x Wᵀ + b; ẏ None when every tangent is None.

    Args:
        x: (..., Din); weight (Dout, Din); bias None or (Dout,); one dtype and device.
        x_dot, weight_dot, bias_dot: None or shaped like their primals.
    """
    if x_dot is None:
        y = torch.nn.functional.linear(x, weight, bias)
        y_dot = None
    else:
        lead, d_out = x.shape[:-1], weight.shape[0]
        # (2M, Dout) from one GEMM, seen as (2, ..., Dout): [0] the primal rows, [1] the tangent.
        out = torch.mm(torch.cat((_rows(x), _rows(x_dot))), weight.t()).view(2, *lead, d_out)
        # A fresh buffer for y (never a view of the stacked output), made by the bias add.
        y = torch.add(out[0], bias) if bias is not None else out[0].clone()
        # The tangent rows as a plain tensor, not an autograd view: the output buffer is freed
        # when the tangent is dropped.
        y_dot = out[1].detach()
    if weight_dot is not None:
        y_dot = torch.nn.functional.linear(x, weight_dot) if y_dot is None else y_dot.add_(
            torch.nn.functional.linear(x, weight_dot))
    if bias_dot is not None:
        y_dot = bias_dot.expand(y.shape).clone() if y_dot is None else y_dot.add_(bias_dot)
    return y, y_dot


def jvp_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    need_x: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW, db), None where not needed: dx = g W, dW = gᵀ x, db = Σ g."""
    g2 = _rows(grad_y)
    dx = torch.mm(g2, weight).view(*x.shape[:-1], weight.shape[1]) if need_x else None
    dw = torch.mm(g2.t(), _rows(x)) if need_weight else None
    db = g2.sum(0) if need_bias else None
    return dx, dw, db
