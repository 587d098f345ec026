"""``jvp_attention``: scaled dot-product attention that works under forward-mode AD.

A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same signature, layout
and results) that also works under ``torch.func.jvp`` and ``torch.autograd.forward_ad``,
where PyTorch's fused SDPA kernels raise and its math path stores Nq×Nk buffers.

How the tangent is fused with the primal: the functional unpacks the tangents of its dual
inputs and hands them to the autograd Function as extra inputs, so a single kernel computes
the output and its tangent together; the Function's ``jvp`` then returns that tangent.

The tangent output carries no autograd history (no ``grad_fn``): gradients flow to q, k, v
through the primal output only. That is what MeanFlow needs (its target is under a
stop-gradient) and it is the memory win: nothing of the tangent computation is kept for
backward. Gradients never flow through the tangent, also where the incoming tangents carry
autograd history. ``torch.func.grad`` / ``vjp`` run the reference backward on torch.func's
wrapped tensors, and ``vmap`` one fused call per slice. Refused with a ValueError: nested
``torch.func.jvp`` (higher-order forward AD), any differentiation of the backward (``grad`` of
``grad``, ``jvp`` of ``grad``, a backward inside a dual level: it reads the saved log-sum-exp,
which has neither graph nor tangent) and double backward (``create_graph=True``).
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD

from meanflow.ops._checks import (TRITON_DTYPES, autocast, check_same_device, check_tangent, check_tensor,
                                  unit_last_stride)
from meanflow.ops.dispatch import implementation, resolve_backend
from meanflow.ops.pair import KERNEL_OP, PairOp, apply_pair, refuse_double_backward

_TRITON_MAX_HEAD_DIM = 256


def _forward(inputs, tangents, options):
    q, k, v, mask = inputs
    q_dot, k_dot, v_dot, _ = tangents
    is_causal, scale, backend = options
    out, out_dot, lse = implementation("jvp_attention", backend).jvp_attention_forward(
        q, k, v, q_dot, k_dot, v_dot, mask, is_causal, scale)
    return out, out_dot, (lse,)


def _backward(inputs, out, extras, options, grad_out, needs_input_grad):
    q, k, v, mask = inputs
    is_causal, scale, backend = options
    refuse_double_backward("jvp_attention", grad_out, q, k, v)  # neither backend's records a graph
    dq, dk, dv = implementation("jvp_attention", backend).jvp_attention_backward(
        grad_out, q, k, v, out, extras[0], mask, is_causal, scale)
    return tuple(g if need else None for g, need in zip((dq, dk, dv), needs_input_grad)) + (None,)


# Inputs (q, k, v, mask): q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), mask None or
# bool/float broadcastable to (B, Hq, Nq, Nk). Options (is_causal, scale, backend). Output
# (B, Hq, Nq, Dv); extra: the row log-sum-exp (B, Hq, Nq) for the backward.
JVP_ATTENTION = PairOp("jvp_attention", _forward, _backward, save_output=True,
                       differentiable_backward=False, **KERNEL_OP,
                       input_names=("query", "key", "value", "attn_mask"), prepare=unit_last_stride)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Checks SDPA-style arguments; returns (backend, scale, mask broadcastable to 4-D or None)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        check_tensor(name, t)
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: jvp_attention has no dropout, got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise ValueError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if q.dim() not in (3, 4):
        raise ValueError(f"query must be (B, H, Nq, D) or (B, Nq, D), got shape {tuple(q.shape)}")
    for name, t in (("key", k), ("value", v)):
        if t.dim() != q.dim():
            raise ValueError(f"{name} must have query's {q.dim()} dimensions, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have query's dtype {q.dtype}, got {t.dtype}")
        check_same_device(name, t, "query", q)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"key's head dim {k.shape[-1]} must equal query's {q.shape[-1]}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError("query and value must have a head dim of at least 1")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"value's leading shape {tuple(v.shape[:-1])} must equal key's {tuple(k.shape[:-1])}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"key's batch size {k.shape[0]} must equal query's {q.shape[0]}")
    if q.dim() == 4:
        hq, hk = q.shape[1], k.shape[1]
        if enable_gqa:
            if hk == 0 or hq % hk != 0:
                raise ValueError(f"enable_gqa: query heads ({hq}) must be a multiple of key heads ({hk})")
        elif hq != hk:
            raise ValueError(f"key has {hk} heads and query {hq}: set enable_gqa=True for grouped-query attention")

    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")

    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if q.dim() == 4 else (q.shape[0], q.shape[1], k.shape[1])
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.layout != torch.strided:
            raise ValueError(f"attn_mask must be a dense (strided) tensor, got layout {attn_mask.layout}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        check_same_device("attn_mask", attn_mask, "query", q)
        if attn_mask.requires_grad:
            raise ValueError("attn_mask requires grad: gradients to the mask are not supported")
        if fwAD.unpack_dual(attn_mask).tangent is not None:
            raise ValueError("attn_mask has a forward-AD tangent: tangents of the mask are not supported")
        try:
            broadcast = torch.broadcast_shapes(attn_mask.shape, target)
        except RuntimeError:
            broadcast = None
        if broadcast != torch.Size(target):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}")
        attn_mask = fwAD.unpack_dual(attn_mask).primal.expand(target)
        if q.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)

    empty = q.numel() == 0 or k.numel() == 0 or v.numel() == 0
    backend = "reference" if empty else resolve_backend(q.device)
    if backend == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise ValueError(f"query dtype {q.dtype} is not supported by the Triton backend "
                             "(float16, bfloat16, float32); use MEANFLOW_BACKEND=reference")
        if max(q.shape[-1], v.shape[-1]) > _TRITON_MAX_HEAD_DIM:
            raise ValueError(f"head dims up to {_TRITON_MAX_HEAD_DIM} are supported by the Triton backend, "
                             f"got query {q.shape[-1]}, value {v.shape[-1]}")
    return backend, float(scale), attn_mask


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------

def jvp_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention that supports forward-mode AD, as a drop-in for SDPA.

    Args:
        query: (B, Hq, Nq, D) or (B, Nq, D); float16, bfloat16, float32 (float64 on the
            reference backend).
        key: (B, Hk, Nk, D) or (B, Nk, D), query's dtype and device; Hk = Hq unless enable_gqa.
        value: (B, Hk, Nk, Dv) or (B, Nk, Dv).
        attn_mask: None, or bool (True = attend) / floating (added to the scores), broadcastable
            to (B, Hq, Nq, Nk). A key-padding mask (B, 1, 1, Nk) is read as one row per key.
            No gradient or tangent flows to the mask. Finite values below −1e4 count as −1e4
            (a weight of exactly 0 beside any visible key; a row masked whole with −1e9 or
            ``finfo.min`` gets the softmax of its scores, consistently in forward and backward).
        dropout_p: must be 0.0.
        is_causal: causal masking aligned top-left, as SDPA (query i sees keys j <= i).
        scale: softmax scale, default 1/sqrt(D).
        enable_gqa: allow Hq to be a multiple of Hk (query head h reads key head h // (Hq/Hk)).

    Returns:
        (B, Hq, Nq, Dv) or (B, Nq, Dv) in query's dtype. Under ``torch.func.jvp`` or forward AD,
        its tangent is computed in the same kernel as the output and carries no ``grad_fn``.
        Rows with no visible key give zeros (output, tangent and gradients), as SDPA.

    Raises:
        ValueError: naming the argument, for anything unsupported or inconsistent.
    """
    query, key, value = autocast(query, key, value)
    backend, scale, mask = _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    inputs = tuple(unit_last_stride(t) for t in (query, key, value)) + (mask,)
    # Tangents come from the dual inputs; the kernels read rows with unit stride.
    out, _ = apply_pair(JVP_ATTENTION, inputs, None, (is_causal, scale, backend))
    return out.squeeze(1) if squeeze else out


def jvp_attention_pair(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_dot: torch.Tensor | None,
    k_dot: torch.Tensor | None,
    v_dot: torch.Tensor | None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit (primal, tangent) form for the pair-mode forward of a network.

    Args:
        q, k, v, attn_mask, is_causal, scale, enable_gqa: as ``jvp_attention``.
        q_dot, k_dot, v_dot: tangents shaped and typed like q, k, v, or None (zero, no work).

    Returns:
        out: like ``jvp_attention``'s, differentiable to q, k, v.
        out_dot: the same shape, detached (no ``grad_fn``); zeros when every tangent is None.
    """
    for name, tangent, primal in (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)):
        check_tensor(name.removesuffix("_dot"), primal)
        check_tangent(name, tangent, primal)
    q, k, v, q_dot, k_dot, v_dot = autocast(q, k, v, q_dot, k_dot, v_dot)
    backend, scale, mask = _validate(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa)
    tensors = [q, k, v, q_dot, k_dot, v_dot]
    squeeze = q.dim() == 3
    if squeeze:
        tensors = [None if t is None else t.unsqueeze(1) for t in tensors]
    tensors = [unit_last_stride(t) for t in tensors]
    out, out_dot = apply_pair(JVP_ATTENTION, (*tensors[:3], mask), (*tensors[3:], None),
                              (is_causal, scale, backend))
    if out_dot is None:
        out_dot = torch.zeros_like(out)
    if squeeze:
        out, out_dot = out.squeeze(1), out_dot.squeeze(1)
    return out, out_dot
