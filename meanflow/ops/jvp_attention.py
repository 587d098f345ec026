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

``JVPAttentionMode`` routes every ``scaled_dot_product_attention`` call in a block to
``jvp_attention``, for models whose code calls SDPA itself.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from meanflow.ops._checks import (TRITON_DTYPES, autocast, check_same_device, check_tangent, check_tensor,
                                  unit_last_stride)
from meanflow.ops.dispatch import implementation, resolve_backend
from meanflow.ops.pair import KERNEL_OP, PairOp, apply_pair, refuse_double_backward

_TRITON_MAX_HEAD_DIM = 256


# Both ops below share these two: inputs (q, k, v, mask[, cu_seqlens_q, cu_seqlens_k]), options
# (is_causal, scale[, max_seqlen_q, max_seqlen_k], backend); the bracketed ones are the packed
# sequences of jvp_attention_varlen, passed on to the launchers as they are.
def _forward(inputs, tangents, options):
    q, k, v, mask, *sequences = inputs
    is_causal, scale, *lengths, backend = options
    out, out_dot, lse = implementation("jvp_attention", backend).jvp_attention_forward(
        q, k, v, *tangents[:3], mask, is_causal, scale, *sequences, *lengths)
    return out, out_dot, (lse,)


def _backward(inputs, out, extras, options, grad_out, needs_input_grad):
    q, k, v, mask, *sequences = inputs
    is_causal, scale, *lengths, backend = options
    refuse_double_backward("jvp_attention", grad_out, q, k, v)  # neither backend's records a graph
    dq, dk, dv = implementation("jvp_attention", backend).jvp_attention_backward(
        grad_out, q, k, v, out, extras[0], mask, is_causal, scale, *sequences, *lengths)
    grads = tuple(g if need else None for g, need in zip((dq, dk, dv), needs_input_grad))
    return grads + (None,) * (len(inputs) - 3)


# Inputs (q, k, v, mask): q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), mask None or
# bool/float broadcastable to (B, Hq, Nq, Nk). Options (is_causal, scale, backend). Output
# (B, Hq, Nq, Dv); extra: the row log-sum-exp (B, Hq, Nq) for the backward.
JVP_ATTENTION = PairOp("jvp_attention", _forward, _backward, save_output=True,
                       differentiable_backward=False, **KERNEL_OP,
                       input_names=("query", "key", "value", "attn_mask"), prepare=unit_last_stride)

# Packed sequences. Inputs (q, k, v, None, cu_seqlens_q, cu_seqlens_k): q (1, Hq, Tq, D), k and v
# (1, Hk, Tk, D / Dv), views of the packed (T, H, D) tensors; cu_seqlens int32 (S + 1,). Options
# (is_causal, scale, max_seqlen_q, max_seqlen_k, backend). Output (1, Hq, Tq, Dv), lse (1, Hq, Tq).
JVP_ATTENTION_VARLEN = PairOp("jvp_attention_varlen", _forward, _backward, save_output=True,
                              differentiable_backward=False, **KERNEL_OP,
                              input_names=("query", "key", "value", "attn_mask", "cu_seqlens_q", "cu_seqlens_k"),
                              prepare=unit_last_stride)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def as_heads(t: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA's layouts as the kernels' (B, H, N, D): (N, D) -> (1, 1, N, D), (B, N, D) ->
    (B, 1, N, D), (*batch, H, N, D) -> (prod(batch), H, N, D) (a view where the strides allow)."""
    if t is None or t.dim() == 4:
        return t
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() == 2 else t.unsqueeze(1)
    return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])


def _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Checks SDPA-style arguments; returns (backend, scale, mask as (B, H, Nq, Nk) or None), the
    mask expanded (a view) from what broadcasts to SDPA's (..., Nq, Nk)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        check_tensor(name, t)
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: jvp_attention has no dropout, got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise ValueError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if q.dim() < 2:
        raise ValueError(f"query must be (..., Nq, D), as SDPA's, got shape {tuple(q.shape)}")
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
    batch_dims = q.dim() - 3 if q.dim() >= 4 else q.dim() - 2  # before the heads (4-D and up) or the rows
    if k.shape[:batch_dims] != q.shape[:batch_dims]:
        raise ValueError(f"key's batch shape {tuple(k.shape[:batch_dims])} must equal query's "
                         f"{tuple(q.shape[:batch_dims])}")
    if q.dim() >= 4:
        hq, hk = q.shape[-3], k.shape[-3]
        if enable_gqa:
            if hk == 0 or hq % hk != 0:
                raise ValueError(f"enable_gqa: query heads ({hq}) must be a multiple of key heads ({hk})")
        elif hq != hk:
            raise ValueError(f"key has {hk} heads and query {hq}: set enable_gqa=True for grouped-query attention")

    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")

    target = (*q.shape[:-1], k.shape[-2])
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
        attn_mask = as_heads(fwAD.unpack_dual(attn_mask).primal.expand(target))

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


def _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                     enable_gqa):
    """Checks jvp_attention_varlen's arguments; returns (backend, scale, cu_seqlens_q, cu_seqlens_k
    as int32 on q's device, max_seqlen_q, max_seqlen_k). Reads cu_seqlens on the host: one
    device-to-host copy when they are CUDA tensors, none when they are given on the CPU."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        check_tensor(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be packed as (total tokens, heads, head dim), got shape {tuple(t.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"value has {v.shape[0]} tokens and key {k.shape[0]}: they must be packed alike")
    backend, scale, _ = _validate(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), None, 0.0, is_causal,
                                  scale, enable_gqa)
    bounds = []
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 or int64 tensor of (sequences + 1) offsets, "
                             f"got {cu.dtype} of shape {tuple(cu.shape)}")
        if cu.device.type != "cpu":
            check_same_device(name, cu, "query", q)
        if cu.requires_grad or fwAD.unpack_dual(cu).tangent is not None:
            raise ValueError(f"{name} must not carry a gradient or tangent")
        offsets = cu.tolist()
        if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{name} must rise from 0 to the {total} packed tokens, never falling; "
                             f"got {_abridged(offsets)}")
        bounds.append(offsets)
    if len(bounds[0]) != len(bounds[1]):
        raise ValueError(f"cu_seqlens_q holds {len(bounds[0]) - 1} sequences and cu_seqlens_k "
                         f"{len(bounds[1]) - 1}: one key sequence per query sequence")
    lengths = []
    for name, offsets, given in (("max_seqlen_q", bounds[0], max_seqlen_q), ("max_seqlen_k", bounds[1], max_seqlen_k)):
        longest = max(b - a for a, b in zip(offsets, offsets[1:]))
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, int) or given < longest:
                raise ValueError(f"{name} must be an int of at least the longest sequence ({longest}), got {given!r}")
            longest = given
        lengths.append(longest)
    # The kernels read the offsets at unit stride: a strided int32 view is copied, not read through.
    cu_q, cu_k = (cu.to(device=q.device, dtype=torch.int32, non_blocking=True).contiguous()
                  for cu in (cu_seqlens_q, cu_seqlens_k))
    return backend, scale, cu_q, cu_k, *lengths


def _abridged(values: list[int], keep: int = 8) -> str:
    return str(values) if len(values) <= keep else f"[{', '.join(map(str, values[:keep]))}, ...] ({len(values)})"


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
        query: (*batch, Hq, Nq, D) as SDPA takes it: (B, Hq, Nq, D), any number of batch dims,
            or no heads, (B, Nq, D) and (Nq, D); float16, bfloat16, float32 (float64 on the
            reference backend).
        key: (*batch, Hk, Nk, D), query's batch dims, dtype and device; Hk = Hq unless enable_gqa.
        value: (*batch, Hk, Nk, Dv).
        attn_mask: None, or bool (True = attend) / floating (added to the scores), broadcastable
            to (*batch, Hq, Nq, Nk). A key-padding mask (B, 1, 1, Nk) is read as one row per key.
            No gradient or tangent flows to the mask. Finite values below −1e4 count as −1e4
            (a weight of exactly 0 beside any visible key; a row masked whole with −1e9 or
            ``finfo.min`` gets the softmax of its scores, consistently in forward and backward).
        dropout_p: must be 0.0.
        is_causal: causal masking aligned top-left, as SDPA (query i sees keys j <= i).
        scale: softmax scale, default 1/sqrt(D).
        enable_gqa: allow Hq to be a multiple of Hk (query head h reads key head h // (Hq/Hk)).

    Returns:
        (*batch, Hq, Nq, Dv) in query's dtype. Under ``torch.func.jvp`` or forward AD,
        its tangent is computed in the same kernel as the output and carries no ``grad_fn``.
        Rows with no visible key give zeros (output, tangent and gradients), as SDPA.

    Raises:
        ValueError: naming the argument, for anything unsupported or inconsistent.
    """
    query, key, value = autocast(query, key, value)
    backend, scale, mask = _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    shape = (*query.shape[:-1], value.shape[-1])
    inputs = tuple(unit_last_stride(as_heads(t)) for t in (query, key, value)) + (mask,)
    # Tangents come from the dual inputs; the kernels read rows with unit stride.
    out, _ = apply_pair(JVP_ATTENTION, inputs, None, (is_causal, scale, backend))
    return out if query.dim() == 4 else out.view(shape)  # no view op on the usual layout


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
    shape = (*q.shape[:-1], v.shape[-1])
    tensors = [unit_last_stride(as_heads(t)) for t in (q, k, v, q_dot, k_dot, v_dot)]
    out, out_dot = apply_pair(JVP_ATTENTION, (*tensors[:3], mask), (*tensors[3:], None),
                              (is_causal, scale, backend))
    if out_dot is None:
        out_dot = torch.zeros_like(out)
    return (out, out_dot) if q.dim() == 4 else (out.view(shape), out_dot.view(shape))


def jvp_attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention over sequences of different lengths packed along the token axis, with no padding
    (flash-attn's ``varlen`` layout); works under forward-mode AD as ``jvp_attention`` does.

    Sequence i is query rows cu_seqlens_q[i] .. cu_seqlens_q[i + 1] − 1, attending to key rows
    cu_seqlens_k[i] .. cu_seqlens_k[i + 1] − 1 only: one call gives what ``jvp_attention`` gives
    each sequence alone.

    Args:
        query: (Tq, Hq, D), Tq the total of the query lengths; float16, bfloat16, float32 (float64
            on the reference backend).
        key: (Tk, Hk, D); value: (Tk, Hk, Dv); query's dtype and device, Hk = Hq unless enable_gqa.
        cu_seqlens_q, cu_seqlens_k: int32 or int64 (S + 1,), rising from 0 to Tq (Tk); on query's
            device or on the CPU. They are read on the host to be checked: given on the CPU, that
            costs no device synchronisation.
        max_seqlen_q, max_seqlen_k: the longest lengths, or None to take them from the offsets;
            a value below the longest is refused.
        is_causal: causal within each sequence, aligned top-left as SDPA (query i of a sequence
            sees its keys j <= i; the same as bottom-right alignment where a sequence has as many
            queries as keys).
        scale, enable_gqa: as ``jvp_attention``.

    Returns:
        (Tq, Hq, Dv) in query's dtype. Its tangent under ``torch.func.jvp`` or forward AD comes
        from the same kernel and carries no ``grad_fn``; a query row with no key gives zeros.
    """
    out, _ = _varlen(query, key, value, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                     scale, enable_gqa)
    return out


def jvp_attention_varlen_pair(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_dot: torch.Tensor | None,
    k_dot: torch.Tensor | None,
    v_dot: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit (primal, tangent) form of ``jvp_attention_varlen``.

    Args:
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
            enable_gqa: as ``jvp_attention_varlen``.
        q_dot, k_dot, v_dot: tangents shaped and typed like q, k, v, or None (zero, no work).

    Returns:
        out (Tq, Hq, Dv), differentiable to q, k, v; out_dot the same shape, detached (zeros when
        every tangent is None).
    """
    for name, tangent, primal in (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)):
        check_tensor(name.removesuffix("_dot"), primal)
        check_tangent(name, tangent, primal)
    out, out_dot = _varlen(q, k, v, (q_dot, k_dot, v_dot), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           is_causal, scale, enable_gqa)
    return out, torch.zeros_like(out) if out_dot is None else out_dot


def _varlen(q, k, v, tangents, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
            enable_gqa):
    """Both varlen forms: ``tangents`` (q_dot, k_dot, v_dot) for the pair form, None for forward AD."""
    q, k, v, *tangents_cast = autocast(q, k, v, *(tangents or ()))
    backend, scale, cu_q, cu_k, max_q, max_k = _validate_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, enable_gqa)

    def as_heads(t):  # (T, H, D) -> (1, H, T, D), a view: the kernels read the packed rows in place
        return None if t is None else unit_last_stride(t.transpose(0, 1).unsqueeze(0))

    inputs = (as_heads(q), as_heads(k), as_heads(v), None, cu_q, cu_k)
    pair_tangents = None if tangents is None else (*map(as_heads, tangents_cast), None, None, None)
    out, out_dot = apply_pair(JVP_ATTENTION_VARLEN, inputs, pair_tangents, (is_causal, scale, max_q, max_k, backend))
    return tuple(None if t is None else t.squeeze(0).transpose(0, 1) for t in (out, out_dot))


class JVPAttentionMode(TorchFunctionMode):
    """Inside ``with JVPAttentionMode():`` every ``F.scaled_dot_product_attention`` call runs
    :func:`jvp_attention` instead, with the same arguments: a model that calls SDPA itself
    (diffusers, transformers, timm blocks) works under ``torch.func.jvp`` and forward AD unchanged.

    Example::

        with JVPAttentionMode():
            out, out_dot = torch.func.jvp(model, (x,), (x_dot,))

    It is a ``TorchFunctionMode``, so it sees the model's own SDPA calls however its code refers
    to SDPA (also ``from torch.nn.functional import scaled_dot_product_attention`` at import), but
    it is also called for every other torch function in the block (and passes them on): 1–2 µs
    of Python each. What ``jvp_attention`` refuses is refused here too, with the same
    ValueError: notably ``dropout_p > 0`` (a model in training mode that applies attention
    dropout).

    Not seen, because torch runs them with the mode off:
    - SDPA called from inside another torch function that takes overrides itself, notably
      ``nn.MultiheadAttention`` (``F.multi_head_attention_forward``), so ``nn.Transformer*``
      layers still raise under ``torch.func.jvp``;
    - the recomputation of a block under activation checkpointing (``torch.utils.checkpoint``),
      which runs during the backward: its backward fails with a ``CheckpointError``. Turn
      checkpointing off inside the mode, or call :func:`jvp_attention` in the model's code.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Inside this method the mode is off, so jvp_attention's own torch calls pass straight on.
        if func is F.scaled_dot_product_attention:
            return jvp_attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
