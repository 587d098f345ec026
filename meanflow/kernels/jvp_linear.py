"""``jvp_linear`` on CUDA: cuBLAS GEMMs for the primal and tangent rows.

    y = x Wᵀ + b      ẏ = ẋ Wᵀ (+ x Ẇᵀ + ḃ, parameter tangents, rare)

There is no Triton GEMM here on purpose: cuBLAS is the kernel, and a Triton GEMM would lose
to it. What this module decides is how the two products are issued:

- default: two GEMMs (the reference's ``F.linear`` calls: y with the bias in cuBLAS's epilogue, ẏ); no copies.
- stacked (``MEANFLOW_LINEAR_STACKED=1``): x and ẋ copied into one (2M, Din) buffer and
  multiplied by Wᵀ once, then b added to the x rows. y must not share storage with ẏ
  (downstream ops save y for backward; a y that viewed the stacked output would pin the
  tangent rows until backward, the memory pair mode saves), so the bias add writes y to its
  own buffer and ẏ stays a view of the GEMM output. Measured on an H100 at FLUX's shapes
  (bf16, M=4608, 3072→3072 / 3072→12288) it was 1.24× / 1.17× SLOWER than two GEMMs: the
  copy of [x; ẋ] and the separate bias pass cost more than the taller GEMM gains. It stays
  for the benchmark (bench/bench_jvp_linear.py, provider ``stacked``) and small-M experiments.

The default path, the parameters' tangents and the backward (from the saved x: dx = g W,
dW = gᵀ x, db = Σ g) are the reference's own cuBLAS calls; only the stacked form is here.
Launchers take (..., Din) inputs with any layout; no autograd.
"""
from __future__ import annotations

import os

import torch

from meanflow.reference.jvp_linear import add_parameter_tangent, as_rows, jvp_linear_backward
from meanflow.reference.jvp_linear import jvp_linear_forward as _two_gemms

__all__ = ["jvp_linear_forward", "jvp_linear_backward"]


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
    if x_dot is None or os.environ.get("MEANFLOW_LINEAR_STACKED", "0") != "1":
        return _two_gemms(x, weight, bias, x_dot, weight_dot, bias_dot)
    lead, d_out = x.shape[:-1], weight.shape[0]
    # (2M, Dout) from one GEMM, seen as (2, ..., Dout): [0] the primal rows, [1] the tangent.
    out = torch.mm(torch.cat((as_rows(x), as_rows(x_dot))), weight.t()).view(2, *lead, d_out)
    # A fresh buffer for y (never a view of the stacked output), made by the bias add.
    y = torch.add(out[0], bias) if bias is not None else out[0].clone()
    # The tangent rows as a plain tensor, not an autograd view: the output buffer is freed
    # when the tangent is dropped.
    return y, add_parameter_tangent(out[1].detach(), x, weight_dot, bias_dot, y.shape)
