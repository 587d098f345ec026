"""Triton kernels for ``jvp_attention``: fused primal + tangent forward, and FA2 backward.

Math (DESIGN §3), per (batch, query head) and a block of BLOCK_M queries; s is the softmax
scale, work is done in the base-2 domain (exp2) with S₂ = S·log2(e):

    S  = s·Q Kᵀ + mask               Ṡ = s·(Q̇ Kᵀ + Q K̇ᵀ)
    m  = running row max of S        P̃ = exp(S − m)      l = Σ P̃
    Õ  = Σ P̃ V                        T̃ = Σ P̃ V̇ + (P̃ ⊙ Ṡ) V      r̃ = Σ P̃ ⊙ Ṡ

Õ, T̃, r̃ and l are all rescaled by the same α = exp(m_old − m_new) when the max moves, since
Ṡ does not enter the max. In the lazy form m moves only when some row's max grew by more than
``RESCALE_THRESHOLD`` (base 2), so most key blocks skip the rescale and p stays <= 2^threshold.
The two tangent products P̃V̇ and (P̃⊙Ṡ)V share one accumulator T̃ (one MMA chain
[P̃, P̃⊙Ṡ]·[V̇; V]), as do the two score tangents (Q̇Kᵀ + QK̇ᵀ). Epilogue:

    O = Õ / l      μ = r̃ / l  (tangent of the log-sum-exp)      Ȯ = T̃ / l − μ·O
    lse = m + log l   (+inf for a row with no visible key, so the backward's P is 0 there)

The primal-only forward is the same kernel with every tangent flag off. The backward is
FlashAttention-2's, from the saved lse: P = exp(S − lse), Δ = rowsum(dO ⊙ O),
dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − Δ), dK = s·dSᵀ Q (one program per key block, looping over the
query heads that share it, so GQA needs no atomics), dQ = s·dS K (one program per query block).
The dQ kernel runs first and its programs also compute Δ for their rows, from the dO tile they
load anyway: no separate pass over dO and O, and no float32 copies of them.

Every kernel scores through ``_masked_scores``, which applies the sequence edge, the causal
rule (top-left, as SDPA) and the mask (none, one row per key broadcast over queries for
key-padding masks, or a full strided tile).

Launchers take tensors and return tensors; there is no autograd here.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from meanflow.kernels.launch import (autotuning, cdiv, interpreting, next_power_of_2, on_tensor_device,
                                     split_program_id)
from meanflow.reference.jvp_attention import MASK_FLOOR as _MASK_FLOOR

LOG2E = 1.4426950408889634  # = 1 / ln 2
MASK_FLOOR = tl.constexpr(_MASK_FLOOR)  # the lowest finite additive mask value (reference.jvp_attention)

# Mask kinds (constexpr): no mask, one value per key (broadcast over queries: key padding),
# a full (query, key) tile read through strides (stride 0 on broadcast dims).
MASK_NONE, MASK_KEYS, MASK_FULL = 0, 1, 2

# The forward's lazy form (LAZY_RESCALE, autotuned against the eager form) moves its accumulators
# to a new running max only when some row's max grew by more than this many powers of two
# (DESIGN §3's online softmax). Skipping a rescale saves the multiplies of Õ and T̃ (128 per thread
# per key block at d = 128, a fifth of the loop); the stale max bounds p by 2^8. fp16 inputs use
# 0 (rescale whenever a max grows, p <= 1 as in the eager form), since P̃⊙Ṡ is rounded to fp16
# for its product with V. A negative value leaves only the eager form: rescale on every block.
RESCALE_THRESHOLD = 8.0


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

# H100 candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), default first, chosen by compiling
# for sm_90 on the CPU (bench/hopper_report.py): no spills inside the loop, wgmma in use, shared
# memory within 227 KiB. The good shapes differ per kernel: dK/dV streams queries (BLOCK_M)
# past a resident key block, dQ streams keys past a resident query block.
FORWARD_TILES = [
    (128, 32, 8, 2),
    (128, 64, 8, 2),
    (128, 32, 8, 3),
    (64, 32, 4, 2),
    (64, 32, 4, 3),
    # Primal only: the tangent accumulators would spill these.
    (128, 64, 8, 3),
    (128, 128, 8, 2),
]
BWD_DKDV_TILES = [
    (64, 64, 8, 2),
    (64, 64, 8, 3),
    (128, 64, 8, 2),
    (64, 32, 4, 2),
    (64, 32, 4, 3),
]
BWD_DQ_TILES = [
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (64, 128, 8, 2),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (128, 32, 8, 2),
]
# The interpreter cannot benchmark: exactly one configuration.
INTERPRETER_TILE = (32, 32, 4, 1)
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes of dynamic shared memory per block on an H100


def _configs(tiles: list[tuple[int, int, int, int]], **variants: tuple) -> list[triton.Config]:
    """One configuration per tile and per combination of ``variants`` (meta-parameter -> its
    values, first value first: the order of the default). The interpreter gets exactly one (its
    tile; the launcher passes the variants), since autotuning over several fails there."""
    if interpreting():
        tiles, variants = [INTERPRETER_TILE], {}
    combos = [dict(zip(variants, values)) for values in itertools.product(*variants.values())]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **combo}, num_warps=w, num_stages=s)
            for bm, bn, w, s in tiles for combo in combos]


def _forward_shared_memory(bm, bn, stages, d, e, kw):
    """Pipelined K, V (and K̇, V̇) tiles plus the resident Q (and Q̇) tile, bytes."""
    streamed = 2 + kw.get("HAS_K_DOT", False) + kw.get("HAS_V_DOT", False)
    return (streamed * bn * d * stages + (1 + kw.get("HAS_Q_DOT", False)) * bm * d) * e


def _forward_fits_registers(bm, bn, kw):
    # Two fp32 (BLOCK_M, d) accumulators plus the score and score-tangent tiles: beyond
    # 128×64 per program they spill inside the loop at every head dim.
    has_tangent = kw.get("HAS_Q_DOT") or kw.get("HAS_K_DOT") or kw.get("HAS_V_DOT")
    return not has_tangent or bm * bn <= 128 * 64


def _forward_pruner(configs, named_args, **kwargs):
    """Tiles that fit, each lazy and eager (DESIGN §3's rescale), or eager only when
    ``RESCALE_THRESHOLD`` < 0 (passed as rescale_threshold)."""
    if named_args["rescale_threshold"] < 0:  # (the interpreter's one config has no LAZY_RESCALE)
        configs = [c for c in configs if not c.kwargs.get("LAZY_RESCALE", False)]
    return _pruner(_forward_shared_memory, _forward_fits_registers)(configs, named_args, **kwargs)


def _dkdv_shared_memory(bm, bn, stages, d, e, kw):
    return (2 * bm * d * stages + 2 * bn * d) * e + 2 * bm * bn + 1024


def _dq_shared_memory(bm, bn, stages, d, e, kw):
    return (2 * bn * d * stages + 2 * bm * d) * e


def _pruner(shared_memory, fits_registers=lambda bm, bn, kw: True):
    """An early_config_prune that keeps the tiles that fit an H100; pinned to the first of
    them unless autotuning (MEANFLOW_AUTOTUNE=0)."""

    def prune(configs, named_args, **kwargs):
        element = named_args["Q"].dtype.itemsize
        d = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
        kept = [
            c for c in configs
            if shared_memory(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], max(c.num_stages, 1), d, element, kwargs)
            <= SHARED_MEMORY_LIMIT and fits_registers(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], kwargs)
        ]
        # The smallest tile always fits; keep something rather than fail.
        kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]
        return kept if autotuning() else kept[:1]

    return prune


_FORWARD_KEY = ["n_queries", "n_keys", "HEAD_DIM", "VALUE_DIM", "IS_CAUSAL", "MASK_KIND", "VARLEN",
                "HAS_Q_DOT", "HAS_K_DOT", "HAS_V_DOT", "rescale_threshold"]
_BACKWARD_KEY = ["n_queries", "n_keys", "HEAD_DIM", "VALUE_DIM", "IS_CAUSAL", "MASK_KIND", "VARLEN"]

# A sequence edge needs no mask when its length is a multiple of the tile side the autotuner chose
# (FLUX's 4608 tokens are 36 × 128; a multiple of 64 takes the unmasked path with 64-wide tiles).
# Decided per configuration, after the autotuner's choice: heuristics see BLOCK_M and BLOCK_N.
# Packed sequences (VARLEN) have edges wherever a sequence ends: n_queries and n_keys are then
# only the longest lengths, so the edges stay masked.
_EVEN_KEYS = {"EVEN_N": lambda args: not args["VARLEN"] and args["n_keys"] % args["BLOCK_N"] == 0}
_EVEN_QUERIES_AND_KEYS = dict(
    _EVEN_KEYS, EVEN_M=lambda args: not args["VARLEN"] and args["n_queries"] % args["BLOCK_M"] == 0)


# --------------------------------------------------------------------------------------------
# Shared core
# --------------------------------------------------------------------------------------------

@triton.jit
def _masked_scores(
    q, k_t, mask_ptr, offs_m, offs_n, n_queries, n_keys, stride_mask_m, stride_mask_n, scale_log2,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr,
    KEYS_IN_BOUNDS: tl.constexpr,
):
    """Base-2 scores s·log2(e)·(q k_t) + mask·log2(e) of a (BLOCK_M, BLOCK_N) tile, −inf where hidden.
    KEYS_IN_BOUNDS: every key of the tile exists (n_keys is a multiple of BLOCK_N), so only the
    causal rule and the mask can hide one; with neither, the tile needs no select at all."""
    scores = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2
    if not KEYS_IN_BOUNDS or IS_CAUSAL or MASK_KIND != 0:
        if KEYS_IN_BOUNDS:
            visible = offs_n[None, :] >= 0  # all true: the causal rule and the mask narrow it below
        else:
            visible = (offs_n < n_keys)[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        if MASK_KIND == 1:
            mask_tile = tl.load(mask_ptr + offs_n * stride_mask_n, mask=offs_n < n_keys, other=0)[None, :]
        elif MASK_KIND == 2:
            mask_tile = tl.load(
                mask_ptr + offs_m[:, None] * stride_mask_m + offs_n[None, :] * stride_mask_n,
                mask=(offs_m < n_queries)[:, None] & (offs_n < n_keys)[None, :],
                other=0,
            )
        if MASK_KIND != 0:
            if MASK_BOOL:
                visible = visible & (mask_tile != 0)
            else:
                # Finite values below MASK_FLOOR count as it (the reference's floored_mask):
                # finfo.min would overflow once scaled, −1e9 would drown the scores.
                additive = mask_tile.to(tl.float32)
                additive = tl.where(additive < MASK_FLOOR,
                                    tl.where(additive == float("-inf"), additive, MASK_FLOOR), additive)
                # One rounding (fma): padding rows' scores sit near −1.44e4, spaced 2^-10 apart.
                scores = tl.fma(additive, 1.4426950408889634, scores)
        scores = tl.where(visible, scores, float("-inf"))
    return scores


@triton.jit
def _hint_aligned(stride_b, stride_h, stride_n, ROWS_ALIGNED: tl.constexpr):
    """Strides in elements. When every row starts on a 16-byte boundary the launcher passes them
    divided by 8 (ROWS_ALIGNED): the product by 8 shows the compiler that rows are aligned, so
    tiles load with vector and async copies at head dims that are not multiples of 16 (72, 96)."""
    if ROWS_ALIGNED:
        stride_b = stride_b * 8
        stride_h = stride_h * 8
        stride_n = stride_n * 8
    return stride_b, stride_h, stride_n


@triton.jit
def _load_tile(ptr, offs_rows, offs_cols, stride_rows, n_rows, n_cols, ROWS_IN_BOUNDS: tl.constexpr):
    """(rows, cols) tile with unit column stride, zero outside [0, n_rows) × [0, n_cols);
    ROWS_IN_BOUNDS: every row exists, so only the columns are masked."""
    mask = (offs_cols < n_cols)[None, :]
    if not ROWS_IN_BOUNDS:
        mask = mask & (offs_rows < n_rows)[:, None]
    return tl.load(ptr + offs_rows[:, None] * stride_rows + offs_cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_tile_t(ptr, offs_rows, offs_cols, stride_rows, n_rows, n_cols, ROWS_IN_BOUNDS: tl.constexpr):
    """The transpose (cols, rows) of the tile ``_load_tile`` would read."""
    mask = (offs_cols < n_cols)[:, None]
    if not ROWS_IN_BOUNDS:
        mask = mask & (offs_rows < n_rows)[None, :]
    return tl.load(ptr + offs_rows[None, :] * stride_rows + offs_cols[:, None], mask=mask, other=0.0)


@triton.jit
def _packed_sequence(Cu_q, Cu_k, sequence):
    """(first query row, first key row, n_queries, n_keys) of a sequence of tensors packed along
    their rows (VARLEN: one batch element): its queries are rows cu_q[i] .. cu_q[i + 1] − 1, and
    likewise its keys."""
    q_first = tl.load(Cu_q + sequence)
    k_first = tl.load(Cu_k + sequence)
    n_queries = tl.load(Cu_q + sequence + 1) - q_first
    n_keys = tl.load(Cu_k + sequence + 1) - k_first
    return q_first.to(tl.int64), k_first.to(tl.int64), n_queries, n_keys


@triton.jit
def _key_end(pid_m, n_queries, n_keys, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key that query block pid_m can see (0 for a block past a packed
    sequence's end: the grid covers the longest sequence)."""
    hi = n_keys
    if IS_CAUSAL:
        hi = tl.minimum(n_keys, (pid_m + 1) * BLOCK_M)
    if VARLEN:
        hi = tl.where(pid_m * BLOCK_M < n_queries, hi, 0)
    return hi


# --------------------------------------------------------------------------------------------
# Forward (primal, or primal + tangent)
# --------------------------------------------------------------------------------------------

@triton.autotune(configs=_configs(FORWARD_TILES, LAZY_RESCALE=(True, False)), key=_FORWARD_KEY,
                 prune_configs_by={"early_config_prune": _forward_pruner})
@triton.heuristics(_EVEN_KEYS)
@triton.jit
def _jvp_attention_fwd_kernel(
    Q, K, V, Q_dot, K_dot, V_dot, Mask, Out, Out_dot, Lse, Cu_q, Cu_k,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqm, stride_tkb, stride_tkh, stride_tkn, stride_tvb, stride_tvh, stride_tvn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    n_heads, n_queries, n_keys, group, scale, rescale_threshold,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr,
    HAS_Q_DOT: tl.constexpr, HAS_K_DOT: tl.constexpr, HAS_V_DOT: tl.constexpr, LAZY_RESCALE: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HAS_TANGENT: tl.constexpr = HAS_Q_DOT or HAS_K_DOT or HAS_V_DOT
    HAS_SCORE_TANGENT: tl.constexpr = HAS_Q_DOT or HAS_K_DOT
    stride_qb, stride_qh, stride_qm = _hint_aligned(stride_qb, stride_qh, stride_qm, ROWS_ALIGNED)
    stride_kb, stride_kh, stride_kn = _hint_aligned(stride_kb, stride_kh, stride_kn, ROWS_ALIGNED)
    stride_vb, stride_vh, stride_vn = _hint_aligned(stride_vb, stride_vh, stride_vn, ROWS_ALIGNED)
    stride_tqb, stride_tqh, stride_tqm = _hint_aligned(stride_tqb, stride_tqh, stride_tqm, ROWS_ALIGNED)
    stride_tkb, stride_tkh, stride_tkn = _hint_aligned(stride_tkb, stride_tkh, stride_tkn, ROWS_ALIGNED)
    stride_tvb, stride_tvh, stride_tvn = _hint_aligned(stride_tvb, stride_tvh, stride_tvn, ROWS_ALIGNED)
    pid_m, pid_bh = split_program_id(tl.cdiv(n_queries, BLOCK_M))
    batch, head = pid_bh // n_heads, pid_bh % n_heads
    kv_head = head // group
    scale_log2 = scale * 1.4426950408889634
    q_start, k_start = 0, 0
    if VARLEN:  # the batch axis numbers the packed sequences; n_queries, n_keys were the longest
        q_start, k_start, n_queries, n_keys = _packed_sequence(Cu_q, Cu_k, batch)
        batch = 0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k_base = K + batch * stride_kb + kv_head * stride_kh + k_start * stride_kn
    v_base = V + batch * stride_vb + kv_head * stride_vh + k_start * stride_vn
    mask_base = Mask + batch * stride_mb + head * stride_mh
    q = _load_tile(Q + batch * stride_qb + head * stride_qh + q_start * stride_qm, offs_m, offs_d, stride_qm,
                   n_queries, HEAD_DIM, False)
    if HAS_Q_DOT:
        q_dot = _load_tile(Q_dot + batch * stride_tqb + head * stride_tqh + q_start * stride_tqm, offs_m, offs_d,
                           stride_tqm, n_queries, HEAD_DIM, False)
    if HAS_K_DOT:
        k_dot_base = K_dot + batch * stride_tkb + kv_head * stride_tkh + k_start * stride_tkn
    if HAS_V_DOT:
        v_dot_base = V_dot + batch * stride_tvb + kv_head * stride_tvh + k_start * stride_tvn

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if HAS_TANGENT:
        acc_dot = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        lse_dot = tl.zeros([BLOCK_M], tl.float32)

    hi = _key_end(pid_m, n_queries, n_keys, IS_CAUSAL, VARLEN, BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_t = _load_tile_t(k_base, offs_n, offs_d, stride_kn, n_keys, HEAD_DIM, EVEN_N)
        scores = _masked_scores(q, k_t, mask_base, offs_m, offs_n, n_queries, n_keys, stride_mm, stride_mn,
                                scale_log2, IS_CAUSAL, MASK_KIND, MASK_BOOL, PRECISION, EVEN_N)
        if HAS_SCORE_TANGENT:
            # Ṡ first, beside S: p and p ⊙ Ṡ then take their places, and only their 16-bit
            # copies live through the products with V and V̇ (fewer registers at the peak).
            score_dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_Q_DOT:
                score_dot = tl.dot(q_dot, k_t, score_dot, input_precision=PRECISION)
            if HAS_K_DOT:
                k_dot_t = _load_tile_t(k_dot_base, offs_n, offs_d, stride_tkn, n_keys, HEAD_DIM, EVEN_N)
                score_dot = tl.dot(q, k_dot_t, score_dot, input_precision=PRECISION)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # Lazy rescaling: the accumulators move to a new max only when some row's max grew by more
        # than rescale_threshold (base 2); otherwise the stale max stays, and p <= 2^threshold.
        # A row's first visible key always moves it (growth +inf), so p never overflows.
        if LAZY_RESCALE:
            # (−inf → finite counts as +1e30; the floor keeps −inf − −inf, a NaN, out.)
            growth = tl.where(new_max > row_max, new_max - tl.maximum(row_max, -1e30), 0.0)
            rescale = tl.max(growth, 0) > rescale_threshold
        else:
            rescale = True
        if rescale:
            # Rows with nothing visible yet keep max −inf: exponentiate against 0 there.
            alpha = tl.exp2(row_max - tl.where(new_max == float("-inf"), 0.0, new_max))
            row_sum = row_sum * alpha
            acc = acc * alpha[:, None]
            if HAS_TANGENT:
                acc_dot = acc_dot * alpha[:, None]
                lse_dot = lse_dot * alpha
            row_max = new_max
        safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        p = tl.exp2(scores - safe_max[:, None])
        row_sum = row_sum + tl.sum(p, 1)
        if HAS_SCORE_TANGENT:
            p_score_dot = p * (score_dot * scale)
            lse_dot = lse_dot + tl.sum(p_score_dot, 1)
        v = _load_tile(v_base, offs_n, offs_dv, stride_vn, n_keys, VALUE_DIM, EVEN_N)
        p = p.to(v.dtype)
        acc = tl.dot(p, v, acc, input_precision=PRECISION)
        if HAS_V_DOT:
            v_dot = _load_tile(v_dot_base, offs_n, offs_dv, stride_tvn, n_keys, VALUE_DIM, EVEN_N)
            acc_dot = tl.dot(p, v_dot, acc_dot, input_precision=PRECISION)
        if HAS_SCORE_TANGENT:
            acc_dot = tl.dot(p_score_dot.to(v.dtype), v, acc_dot, input_precision=PRECISION)

    empty = row_sum == 0.0
    denom = tl.where(empty, 1.0, row_sum)
    out = acc / denom[:, None]
    # lse in natural units: (m₂ + log2 l)·ln 2.
    lse = tl.where(empty, float("inf"), (row_max + tl.log2(denom)) * 0.6931471805599453)
    row_ok = offs_m < n_queries
    out_offsets = (batch * stride_ob + head * stride_oh + (q_start + offs_m)[:, None] * stride_om
                   + offs_dv[None, :])
    out_mask = row_ok[:, None] & (offs_dv < VALUE_DIM)[None, :]
    tl.store(Out + out_offsets, out.to(Out.dtype.element_ty), mask=out_mask)
    tl.store(Lse + batch * stride_lb + head * stride_lh + q_start + offs_m, lse, mask=row_ok)
    if HAS_TANGENT:
        mu = lse_dot / denom
        out_dot = acc_dot / denom[:, None] - mu[:, None] * out
        tl.store(Out_dot + out_offsets, out_dot.to(Out_dot.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@triton.autotune(configs=_configs(BWD_DKDV_TILES), key=_BACKWARD_KEY,
                 prune_configs_by={"early_config_prune": _pruner(_dkdv_shared_memory)})
@triton.heuristics(_EVEN_QUERIES_AND_KEYS)
@triton.jit
def _jvp_attention_bwd_dkdv_kernel(
    Q, K, V, Mask, Grad_out, Lse, Delta, DK, DV, Cu_q, Cu_k,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_gb, stride_gh, stride_gm, stride_lb, stride_lh,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    n_heads, n_kv_heads, n_queries, n_keys, group, scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    stride_qb, stride_qh, stride_qm = _hint_aligned(stride_qb, stride_qh, stride_qm, ROWS_ALIGNED)
    stride_kb, stride_kh, stride_kn = _hint_aligned(stride_kb, stride_kh, stride_kn, ROWS_ALIGNED)
    stride_vb, stride_vh, stride_vn = _hint_aligned(stride_vb, stride_vh, stride_vn, ROWS_ALIGNED)
    stride_gb, stride_gh, stride_gm = _hint_aligned(stride_gb, stride_gh, stride_gm, ROWS_ALIGNED)
    pid_n, pid_bhk = split_program_id(tl.cdiv(n_keys, BLOCK_N))
    batch, kv_head = pid_bhk // n_kv_heads, pid_bhk % n_kv_heads
    scale_log2 = scale * 1.4426950408889634
    q_start, k_start = 0, 0
    if VARLEN:  # the batch axis numbers the packed sequences; n_queries, n_keys were the longest
        q_start, k_start, n_queries, n_keys = _packed_sequence(Cu_q, Cu_k, batch)
        batch = 0

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K + batch * stride_kb + kv_head * stride_kh + k_start * stride_kn, offs_n, offs_d, stride_kn,
                   n_keys, HEAD_DIM, EVEN_N)
    v = _load_tile(V + batch * stride_vb + kv_head * stride_vh + k_start * stride_vn, offs_n, offs_dv,
                   stride_vn, n_keys, VALUE_DIM, EVEN_N)
    k_t = tl.trans(k)
    v_t = tl.trans(v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    hi = n_queries
    if VARLEN:  # a key block past its sequence's end (the grid covers the longest) has no work
        hi = tl.where(pid_n * BLOCK_N < n_keys, hi, 0)
    for g in range(0, group):
        head = kv_head * group + g
        q_base = Q + batch * stride_qb + head * stride_qh + q_start * stride_qm
        g_base = Grad_out + batch * stride_gb + head * stride_gh + q_start * stride_gm
        mask_base = Mask + batch * stride_mb + head * stride_mh
        row_base = batch * stride_lb + head * stride_lh + q_start
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q = _load_tile(q_base, offs_m, offs_d, stride_qm, n_queries, HEAD_DIM, EVEN_M)
            grad_out = _load_tile(g_base, offs_m, offs_dv, stride_gm, n_queries, VALUE_DIM, EVEN_M)
            if EVEN_M:
                lse = tl.load(Lse + row_base + offs_m)
                delta = tl.load(Delta + row_base + offs_m)
            else:
                lse = tl.load(Lse + row_base + offs_m, mask=offs_m < n_queries, other=float("inf"))
                delta = tl.load(Delta + row_base + offs_m, mask=offs_m < n_queries, other=0.0)
            scores = _masked_scores(q, k_t, mask_base, offs_m, offs_n, n_queries, n_keys, stride_mm,
                                    stride_mn, scale_log2, IS_CAUSAL, MASK_KIND, MASK_BOOL, PRECISION, EVEN_N)
            p = tl.exp2(scores - lse[:, None] * 1.4426950408889634)
            dv = tl.dot(tl.trans(p.to(q.dtype)), grad_out, dv, input_precision=PRECISION)
            dp = tl.dot(grad_out, v_t, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)

    rows_k = (k_start + offs_n)[:, None]
    offs_k = batch * stride_dkb + kv_head * stride_dkh + rows_k * stride_dkn + offs_d[None, :]
    tl.store(DK + offs_k, (dk * scale).to(DK.dtype.element_ty),
             mask=(offs_n < n_keys)[:, None] & (offs_d < HEAD_DIM)[None, :])
    offs_v = batch * stride_dvb + kv_head * stride_dvh + rows_k * stride_dvn + offs_dv[None, :]
    tl.store(DV + offs_v, dv.to(DV.dtype.element_ty),
             mask=(offs_n < n_keys)[:, None] & (offs_dv < VALUE_DIM)[None, :])


@triton.autotune(configs=_configs(BWD_DQ_TILES), key=_BACKWARD_KEY,
                 prune_configs_by={"early_config_prune": _pruner(_dq_shared_memory)})
@triton.heuristics(_EVEN_QUERIES_AND_KEYS)
@triton.jit
def _jvp_attention_bwd_dq_kernel(
    Q, K, V, Mask, Grad_out, Out, Lse, Delta, DQ, Cu_q, Cu_k,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_gb, stride_gh, stride_gm, stride_lb, stride_lh,
    stride_ob, stride_oh, stride_om, stride_dqb, stride_dqh, stride_dqm,
    n_heads, n_queries, n_keys, group, scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    stride_qb, stride_qh, stride_qm = _hint_aligned(stride_qb, stride_qh, stride_qm, ROWS_ALIGNED)
    stride_kb, stride_kh, stride_kn = _hint_aligned(stride_kb, stride_kh, stride_kn, ROWS_ALIGNED)
    stride_vb, stride_vh, stride_vn = _hint_aligned(stride_vb, stride_vh, stride_vn, ROWS_ALIGNED)
    stride_gb, stride_gh, stride_gm = _hint_aligned(stride_gb, stride_gh, stride_gm, ROWS_ALIGNED)
    stride_ob, stride_oh, stride_om = _hint_aligned(stride_ob, stride_oh, stride_om, ROWS_ALIGNED)
    pid_m, pid_bh = split_program_id(tl.cdiv(n_queries, BLOCK_M))
    batch, head = pid_bh // n_heads, pid_bh % n_heads
    kv_head = head // group
    scale_log2 = scale * 1.4426950408889634
    q_start, k_start = 0, 0
    if VARLEN:  # the batch axis numbers the packed sequences; n_queries, n_keys were the longest
        q_start, k_start, n_queries, n_keys = _packed_sequence(Cu_q, Cu_k, batch)
        batch = 0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + batch * stride_qb + head * stride_qh + q_start * stride_qm, offs_m, offs_d, stride_qm,
                   n_queries, HEAD_DIM, EVEN_M)
    grad_out = _load_tile(Grad_out + batch * stride_gb + head * stride_gh + q_start * stride_gm, offs_m, offs_dv,
                          stride_gm, n_queries, VALUE_DIM, EVEN_M)
    out = _load_tile(Out + batch * stride_ob + head * stride_oh + q_start * stride_om, offs_m, offs_dv,
                     stride_om, n_queries, VALUE_DIM, EVEN_M)
    # Δ = rowsum(dO ⊙ O) for this block's rows, in float32; the dK/dV kernel, launched next, reads it.
    delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)
    row_base = batch * stride_lb + head * stride_lh + q_start
    lse = tl.load(Lse + row_base + offs_m, mask=offs_m < n_queries, other=float("inf"))
    tl.store(Delta + row_base + offs_m, delta, mask=offs_m < n_queries)
    k_base = K + batch * stride_kb + kv_head * stride_kh + k_start * stride_kn
    v_base = V + batch * stride_vb + kv_head * stride_vh + k_start * stride_vn
    mask_base = Mask + batch * stride_mb + head * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = _key_end(pid_m, n_queries, n_keys, IS_CAUSAL, VARLEN, BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_t = _load_tile_t(k_base, offs_n, offs_d, stride_kn, n_keys, HEAD_DIM, EVEN_N)
        v_t = _load_tile_t(v_base, offs_n, offs_dv, stride_vn, n_keys, VALUE_DIM, EVEN_N)
        scores = _masked_scores(q, k_t, mask_base, offs_m, offs_n, n_queries, n_keys, stride_mm, stride_mn,
                                scale_log2, IS_CAUSAL, MASK_KIND, MASK_BOOL, PRECISION, EVEN_N)
        p = tl.exp2(scores - lse[:, None] * 1.4426950408889634)
        dp = tl.dot(grad_out, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(q.dtype), tl.trans(k_t), dq, input_precision=PRECISION)

    offs_q = batch * stride_dqb + head * stride_dqh + (q_start + offs_m)[:, None] * stride_dqm + offs_d[None, :]
    tl.store(DQ + offs_q, (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m < n_queries)[:, None] & (offs_d < HEAD_DIM)[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _head_block(dim: int) -> int:
    return max(16, next_power_of_2(dim))


def _mask_args(mask: torch.Tensor | None, shape: tuple[int, int, int, int], like: torch.Tensor):
    """(pointer tensor, strides (b, h, m, n), kind, is_bool) of a mask broadcast to ``shape``."""
    if mask is None:
        return like, (0, 0, 0, 0), MASK_NONE, False
    mask = mask.expand(shape)
    is_bool = mask.dtype == torch.bool
    if is_bool:
        mask = mask.view(torch.uint8)
    kind = MASK_KEYS if mask.stride(2) == 0 else MASK_FULL
    return mask, tuple(mask.stride()), kind, is_bool


_INT32_MAX = 2**31 - 1


def check_head_spans(**tensors: torch.Tensor | None) -> None:
    """Raises ValueError naming the tensor whose (rows, columns) of one batch element and head
    span more than 2^31 − 1 elements: the kernels index within a head in 32 bits (the batch and
    head offsets are 64-bit), which keeps the main loops' address arithmetic short."""
    for name, t in tensors.items():
        if t is None or t.numel() == 0:
            continue
        (rows, cols), (row_stride, col_stride) = t.shape[-2:], t.stride()[-2:]
        span = (rows - 1) * abs(row_stride) + (cols - 1) * abs(col_stride)
        if span > _INT32_MAX:
            raise ValueError(f"{name}: the rows of one batch element and head span {span:,} elements "
                             f"(strides {tuple(t.stride())}), more than the 2^31 - 1 the Triton kernels "
                             "index; use a layout with a smaller row stride, or MEANFLOW_BACKEND=reference")


def check_output_spans(packed: bool, **outputs: tuple[int, int, int]) -> None:
    """``check_head_spans`` for outputs about to be allocated, each given as (rows, heads, dim):
    (B, H, rows, dim) contiguous, or packed (rows, H, dim). An input broadcast along its rows
    (stride 0) spans nothing, while its gradient, written densely, spans them all."""
    for name, (rows, heads, dim) in outputs.items():
        span = (rows - 1) * (heads * dim if packed else dim) + dim - 1
        if rows and span > _INT32_MAX:
            raise ValueError(f"{name}: the rows of one batch element and head would span {span:,} "
                             "elements, more than the 2^31 - 1 the Triton kernels index; use "
                             "MEANFLOW_BACKEND=reference")


def _rows_aligned(*tensors: torch.Tensor | None) -> bool:
    """True when every row of every tensor starts on a 16-byte boundary (strides and the base
    pointer multiples of 8 elements, and of 16 bytes), which the kernels may then assume."""
    for t in tensors:
        if t is None:
            continue
        b, h, n, _ = t.stride()  # the kernels' tensors are 4-D
        if (b | h | n | t.shape[-1]) % 8 or t.data_ptr() % 16:
            return False
    return True


def _rescale_threshold(dtype: torch.dtype) -> float:
    return 0.0 if dtype == torch.float16 and RESCALE_THRESHOLD >= 0 else RESCALE_THRESHOLD


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get full float32 products, as SDPA's math path; 16-bit use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides3(t: torch.Tensor | None, like: torch.Tensor, aligned: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides, divided by 8 when rows are aligned (see _hint_aligned)."""
    b, h, n, _ = (like if t is None else t).stride()
    if aligned:
        return b // 8, h // 8, n // 8
    return b, h, n


def _empty_rows(q: torch.Tensor, last_dim: int, packed: bool) -> torch.Tensor:
    """An uninitialised (B, H, N, last_dim) tensor like q: contiguous, or for packed sequences
    (B = 1) a view of a (N, H, last_dim) tensor, the layout the packed inputs came in."""
    batch, heads, rows = q.shape[:3]
    if packed:
        return torch.empty((batch, rows, heads, last_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.empty((batch, heads, rows, last_dim), device=q.device, dtype=q.dtype)


def _sequence_args(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                   cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int):
    """(programs along the batch, query rows and key rows per program's sequence, Cu_q, Cu_k)."""
    if cu_seqlens_q is None:
        return q.shape[0], q.shape[2], k.shape[2], q, q  # (Cu_q, Cu_k unread)
    return cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k


@on_tensor_device
def jvp_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_dot: torch.Tensor | None = None,
    k_dot: torch.Tensor | None = None,
    v_dot: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fused attention forward, with the tangent when any of q_dot, k_dot, v_dot is given.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hk, Nk, D); v: (B, Hk, Nk, Dv); fp16, bf16 or fp32, one dtype;
            last dimension contiguous (stride 1), any other strides.
        q_dot, k_dot, v_dot: None (zero tangent, no work) or shaped and typed like q, k, v.
        mask: None, or bool / float broadcastable to (B, Hq, Nq, Nk); a (B, 1, 1, Nk) mask is
            read as one row per key.
        is_causal: top-left causal masking (per sequence when packed); scale: default 1/sqrt(D).
        cu_seqlens_q, cu_seqlens_k: None, or packed sequences (B = 1, no mask): int32 (S + 1,) on
            q's device, the first row of each of S sequences and then Nq (Nk); sequence i attends
            within its own rows only. max_seqlen_q, max_seqlen_k: their longest lengths (>= 1).

    Returns:
        out (B, Hq, Nq, Dv) q.dtype (packed: a view of (Nq, Hq, Dv)); out_dot (same) or None;
        lse (B, Hq, Nq) float32.
    """
    batch, n_heads, n_queries, head_dim = q.shape
    n_keys, value_dim = k.shape[2], v.shape[3]
    group = n_heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    has_tangent = any(t is not None for t in (q_dot, k_dot, v_dot))
    packed = cu_seqlens_q is not None
    check_output_spans(packed, output=(n_queries, n_heads, value_dim))
    out = _empty_rows(q, value_dim, packed)
    out_dot = _empty_rows(q, value_dim, packed) if has_tangent else None
    lse = torch.empty((batch, n_heads, n_queries), device=q.device, dtype=torch.float32)
    mask_t, mask_strides, mask_kind, mask_bool = _mask_args(mask, (batch, n_heads, n_queries, n_keys), q)
    check_head_spans(query=q, key=k, value=v, query_tangent=q_dot, key_tangent=k_dot, value_tangent=v_dot,
                     attn_mask=None if mask is None else mask_t)
    aligned = _rows_aligned(q, k, v, q_dot, k_dot, v_dot)
    programs, rows_q, rows_k, cu_q, cu_k = _sequence_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                         max_seqlen_k)

    def grid(meta):
        return (cdiv(rows_q, meta["BLOCK_M"]) * programs * n_heads,)

    _jvp_attention_fwd_kernel[grid](
        q, k, v, q if q_dot is None else q_dot, k if k_dot is None else k_dot, v if v_dot is None else v_dot,
        mask_t, out, out if out_dot is None else out_dot, lse, cu_q, cu_k,
        *_strides3(q, q, aligned), *_strides3(k, k, aligned), *_strides3(v, v, aligned),
        *_strides3(q_dot, q, aligned), *_strides3(k_dot, k, aligned), *_strides3(v_dot, v, aligned),
        *mask_strides, *out.stride()[:3], *lse.stride()[:2],
        n_heads, rows_q, rows_k, group, scale, _rescale_threshold(q.dtype),
        HEAD_DIM=head_dim, VALUE_DIM=value_dim, ROWS_ALIGNED=aligned,
        IS_CAUSAL=is_causal, MASK_KIND=mask_kind, MASK_BOOL=mask_bool, PRECISION=_precision(q.dtype),
        HAS_Q_DOT=q_dot is not None, HAS_K_DOT=k_dot is not None, HAS_V_DOT=v_dot is not None,
        VARLEN=packed, **({"LAZY_RESCALE": RESCALE_THRESHOLD >= 0} if interpreting() else {}),
        BLOCK_D=_head_block(head_dim), BLOCK_DV=_head_block(value_dim),
    )
    return out, out_dot, lse


@on_tensor_device
def jvp_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the primal output from the saved lse (FlashAttention-2).

    Args:
        grad_out: (B, Hq, Nq, Dv), last dimension contiguous; q, k, v, mask, is_causal, scale and
            the packed sequences as in ``jvp_attention_forward``; out, lse: its outputs.

    Returns:
        dq (B, Hq, Nq, D), dk (B, Hk, Nk, D), dv (B, Hk, Nk, Dv) in the inputs' dtype: contiguous,
        or for packed sequences views of (N, H, D) tensors.
    """
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    packed = cu_seqlens_q is not None
    check_output_spans(packed, query_gradient=(n_queries, n_heads, head_dim),
                       key_gradient=(n_keys, n_kv_heads, head_dim),
                       value_gradient=(n_keys, n_kv_heads, value_dim))
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)  # Δ, written by the dQ kernel, read with lse's strides
    dq = _empty_rows(q, head_dim, packed)
    dk, dv = _empty_rows(k, head_dim, packed), _empty_rows(v, value_dim, packed)
    mask_t, mask_strides, mask_kind, mask_bool = _mask_args(mask, (batch, n_heads, n_queries, n_keys), q)
    check_head_spans(grad_output=grad_out)  # the inputs were checked in the forward
    aligned = _rows_aligned(q, k, v, grad_out, out)
    programs, rows_q, rows_k, cu_q, cu_k = _sequence_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                         max_seqlen_k)
    common = (
        *_strides3(q, q, aligned), *_strides3(k, k, aligned), *_strides3(v, v, aligned), *mask_strides,
        *_strides3(grad_out, grad_out, aligned), *lse.stride()[:2],
    )
    flags = dict(
        HEAD_DIM=head_dim, VALUE_DIM=value_dim, ROWS_ALIGNED=aligned,
        IS_CAUSAL=is_causal, MASK_KIND=mask_kind, MASK_BOOL=mask_bool, PRECISION=_precision(q.dtype),
        VARLEN=packed, BLOCK_D=_head_block(head_dim), BLOCK_DV=_head_block(value_dim),
    )
    # dQ first: its programs also compute Δ, which every dK/dV program reads for all its queries.
    _jvp_attention_bwd_dq_kernel[lambda meta: (cdiv(rows_q, meta["BLOCK_M"]) * programs * n_heads,)](
        q, k, v, mask_t, grad_out, out, lse, delta, dq, cu_q, cu_k, *common, *_strides3(out, out, aligned),
        *dq.stride()[:3], n_heads, rows_q, rows_k, group, scale, **flags,
    )
    _jvp_attention_bwd_dkdv_kernel[lambda meta: (cdiv(rows_k, meta["BLOCK_N"]) * programs * n_kv_heads,)](
        q, k, v, mask_t, grad_out, lse, delta, dk, dv, cu_q, cu_k, *common, *dk.stride()[:3], *dv.stride()[:3],
        n_heads, n_kv_heads, rows_q, rows_k, group, scale, **flags,
    )
    return dq, dk, dv
