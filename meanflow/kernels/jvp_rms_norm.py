"""Triton kernel for ``jvp_rms_norm``: RMS norm and its tangent in one pass over the rows.

Math, per row of D elements (x, ẋ) with weight w and its tangent ẇ, all in float32:

    r = rsqrt(mean(x²) + eps)        y = x·r·w
    ẏ = w·(ẋ·r − x·r³·mean(x·ẋ)) + x·r·ẇ

Each program normalizes a (BLOCK_M, BLOCK_D) tile: BLOCK_M whole rows (BLOCK_D, the next power
of two >= D, masked past D), so both row sums come from registers and every element is read
once and written once: x (and ẋ) in, y (and ẏ) out. BLOCK_M = TILE // BLOCK_D rows (at least
one) keeps short rows (FLUX's head dim 128) from leaving most lanes idle. The primal-only and
the tangent variants are the same kernel with constexpr flags off / on (HAS_X_DOT, HAS_W_DOT).

Backward, from x and the output gradient g only (nothing saved but the inputs):

    dx = r·(g·w − n·mean(n·g·w)),  n = x·r          dw = Σ_rows g·n

The weight gradient sums over all rows: a fixed number of programs (a few per SM) each walk
their share of the row blocks and write one float32 partial row; the launcher sums those.

The rows of x and ẋ have unit stride and any row stride; y and ẏ are written contiguous, in
their own dtype (``promote_types(x, w)``). Launchers take tensors and return tensors; there is
no autograd here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meanflow.kernels.launch import autotuning, cdiv, interpreting, next_power_of_2, on_tensor_device


# --------------------------------------------------------------------------------------------
# Configurations (shared with meanflow/kernels/jvp_layer_norm_modulate.py)
# --------------------------------------------------------------------------------------------

# (TILE, num_warps), default first: TILE is the number of elements a program holds per tensor
# (BLOCK_M·BLOCK_D, or BLOCK_D when a row is longer). Row kernels are memory bound: the tile
# only has to give each thread a few 16-byte vectors to keep enough loads in flight.
ROW_TILES = [
    (4096, 8),
    (2048, 4),
    (4096, 4),
    (8192, 8),
    (8192, 16),
    (2048, 8),
    (1024, 4),
]
INTERPRETER_TILE = (4096, 4)  # the interpreter runs a tile as one numpy op: big tiles are fast


def row_configs() -> list[triton.Config]:
    tiles = [INTERPRETER_TILE] if interpreting() else ROW_TILES
    return [triton.Config({"TILE": tile}, num_warps=warps, num_stages=1) for tile, warps in tiles]


def rows_per_program(tile: int, block_d: int) -> int:
    return max(1, tile // block_d)


def row_pruner(configs, named_args, **kwargs):
    """Keeps the configurations that give each thread 4 to 64 elements per tensor (the first
    one always), dropping those that tile identically; pinned to the first unless autotuning."""
    block_d = kwargs["BLOCK_D"]
    kept, seen = [], set()
    for c in configs:
        elements = max(c.kwargs["TILE"], block_d)
        per_thread = elements // (32 * c.num_warps)
        shape = (rows_per_program(c.kwargs["TILE"], block_d), c.num_warps)
        if shape in seen or (kept and not 4 <= per_thread <= 32):
            continue
        seen.add(shape)
        kept.append(c)
    if block_d >= 8192:  # a single 8192-wide row: 16 warps keeps registers in check
        kept.sort(key=lambda c: c.num_warps != 16)
    return kept if autotuning() else kept[:1]


def row_block(dim: int) -> int:
    return next_power_of_2(dim)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

# Combine functions of tl.reduce over tuples: row sums that do not depend on each other share
# one reduction (one round of shuffles, and of shared memory and barriers across warps).
@triton.jit
def sum2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def sum3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.autotune(configs=row_configs(), key=["BLOCK_D", "HAS_W", "HAS_X_DOT", "HAS_W_DOT"],
                 prune_configs_by={"early_config_prune": row_pruner})
@triton.jit
def _jvp_rms_norm_kernel(
    X, X_DOT, W, W_DOT, Y, Y_DOT,
    n_rows, n_cols, stride_x, stride_x_dot, eps,
    HAS_W: tl.constexpr, HAS_X_DOT: tl.constexpr, HAS_W_DOT: tl.constexpr,
    BLOCK_D: tl.constexpr, TILE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TILE // BLOCK_D if TILE > BLOCK_D else 1
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]

    # Loads first; the weight as a tile of row stride 0, in x's layout (meanflow.kernels).
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_X_DOT:
        x_dot = tl.load(X_DOT + rows[:, None] * stride_x_dot + cols[None, :], mask=mask, other=0.0)
    w_offs = rows[:, None] * 0 + cols[None, :]
    if HAS_W:
        w = tl.load(W + w_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_W_DOT:
        w_dot = tl.load(W_DOT + w_offs, mask=mask, other=0.0).to(tl.float32)

    x = x.to(tl.float32)
    if HAS_X_DOT:  # one reduction for both row sums
        x_dot = x_dot.to(tl.float32)
        sum_sq, sum_cross = tl.reduce((x * x, x * x_dot), 1, sum2)
    else:
        sum_sq = tl.sum(x * x, axis=1)
    r = tl.rsqrt(sum_sq / n_cols + eps)
    normed = x * r[:, None]
    if HAS_W:
        y = normed * w
    else:
        y = normed
    if HAS_X_DOT or HAS_W_DOT:
        y_dot = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_X_DOT:
            # r²·mean(x·ẋ): the part of ẋ along x, removed before scaling by r.
            along = r * r * (sum_cross / n_cols)
            normed_dot = (x_dot - x * along[:, None]) * r[:, None]
            if HAS_W:
                y_dot = normed_dot * w
            else:
                y_dot = normed_dot
        if HAS_W_DOT:
            y_dot += normed * w_dot
    out = rows[:, None] * n_cols + cols[None, :]
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=mask)
    if HAS_X_DOT or HAS_W_DOT:
        tl.store(Y_DOT + out, y_dot.to(Y_DOT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

@on_tensor_device
def jvp_rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    x_dot: torch.Tensor | None = None,
    weight_dot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused RMS norm over the rows of x, with the tangent when x_dot or weight_dot is given.

    Args:
        x: (R, D), fp16 / bf16 / fp32, unit last stride, any row stride; D <= 8192.
        weight: (D,) contiguous, fp16 / bf16 / fp32, or None.
        eps: added to the mean square.
        x_dot: like x (its own row stride), or None; weight_dot: like weight, or None.

    Returns:
        y (R, D) contiguous in ``promote_types(x, weight)``; y_dot the same, or None.
    """
    n_rows, n_cols = x.shape
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=out_dtype)
    has_tangent = x_dot is not None or weight_dot is not None
    y_dot = torch.empty_like(y) if has_tangent else None
    if n_rows == 0:
        return y, y_dot
    block_d = row_block(n_cols)

    def grid(meta):
        return (cdiv(n_rows, rows_per_program(meta["TILE"], block_d)),)

    _jvp_rms_norm_kernel[grid](
        x, x if x_dot is None else x_dot, x if weight is None else weight,
        x if weight_dot is None else weight_dot, y, y if y_dot is None else y_dot,
        n_rows, n_cols, x.stride(0), x.stride(0) if x_dot is None else x_dot.stride(0), float(eps),
        HAS_W=weight is not None, HAS_X_DOT=x_dot is not None, HAS_W_DOT=weight_dot is not None,
        BLOCK_D=block_d,
    )
    return y, y_dot


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

def reduction_programs(device: torch.device, n_blocks: int) -> int:
    """How many programs share a cross-row reduction (each loops over its row blocks and writes
    one float32 partial row): a few per SM on a GPU, two in the interpreter."""
    if device.type != "cuda":
        return max(1, min(2, n_blocks))
    return max(1, min(4 * _sm_count(device.index), n_blocks))


_SM_COUNTS: dict[int | None, int] = {}


def _sm_count(index: int | None) -> int:
    if index not in _SM_COUNTS:
        properties = torch.cuda.get_device_properties(index if index is not None else 0)
        _SM_COUNTS[index] = properties.multi_processor_count
    return _SM_COUNTS[index]


@triton.autotune(configs=row_configs(), key=["BLOCK_D", "HAS_W", "NEEDS_DX", "NEEDS_DW"],
                 prune_configs_by={"early_config_prune": row_pruner})
@triton.jit
def _rms_norm_bwd_kernel(
    G, X, W, DX, DW_PARTIAL,
    n_rows, n_cols, stride_g, stride_x, eps, n_programs,
    HAS_W: tl.constexpr, NEEDS_DX: tl.constexpr, NEEDS_DW: tl.constexpr,
    BLOCK_D: tl.constexpr, TILE: tl.constexpr,
):
    """dx = r·(g·w − n·mean(n·g·w)) with n = x·r; dw = Σ_rows g·n, one partial row per program."""
    BLOCK_M: tl.constexpr = TILE // BLOCK_D if TILE > BLOCK_D else 1
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(n_rows, BLOCK_M), n_programs):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        normed = x * r[:, None]
        if NEEDS_DX:
            if HAS_W:
                gw = g * w
            else:
                gw = g
            along = tl.sum(normed * gw, axis=1) / n_cols
            dx = (gw - normed * along[:, None]) * r[:, None]
            tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEEDS_DW:
            dw += tl.sum(g * normed, axis=0)
    if NEEDS_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)


@on_tensor_device
def jvp_rms_norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    needs_x_grad: bool = True,
    needs_weight_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of y = rms_norm(x)·w from grad_y, recomputing the statistics from x.

    Args:
        grad_y: (R, D) in y's dtype, unit last stride; x, weight, eps: as ``jvp_rms_norm_forward``.
        needs_x_grad, needs_weight_grad: which gradients to compute.

    Returns:
        dx (R, D) contiguous in x's dtype, or None; dw (D,) in the weight's dtype, or None
        (also when there is no weight).
    """
    n_rows, n_cols = x.shape
    needs_dw = needs_weight_grad and weight is not None
    dx = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype) if needs_x_grad else None
    if not (needs_x_grad or needs_dw):
        return None, None
    if n_rows == 0:
        return dx, torch.zeros_like(weight) if needs_dw else None
    if grad_y.stride(-1) != 1:
        grad_y = grad_y.contiguous()
    block_d = row_block(n_cols)
    n_programs = reduction_programs(x.device, cdiv(n_rows, rows_per_program(ROW_TILES[0][0], block_d)))
    partial = torch.empty((n_programs, n_cols), device=x.device, dtype=torch.float32) if needs_dw else None
    _rms_norm_bwd_kernel[(n_programs,)](
        grad_y, x, x if weight is None else weight, x if dx is None else dx,
        x if partial is None else partial,
        n_rows, n_cols, grad_y.stride(0), x.stride(0), float(eps), n_programs,
        HAS_W=weight is not None, NEEDS_DX=needs_x_grad, NEEDS_DW=needs_dw, BLOCK_D=block_d,
    )
    return dx, partial.sum(0).to(weight.dtype) if needs_dw else None
