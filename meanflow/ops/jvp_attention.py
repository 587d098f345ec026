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
backward. Backpropagating through the tangent is not supported yet, nor are nested
``torch.func.jvp`` (higher-order forward AD; refused with a ValueError) and ``torch.func.grad``
over the Triton backward (refused likewise; ``.backward()`` and ``torch.autograd.grad`` work).
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.autograd.forward_ad as fwAD

from meanflow.ops.dispatch import implementation, resolve_backend

try:  # functorch internals, used only to refuse what would otherwise be silently wrong
    from torch._C._functorch import TransformType, is_functorch_wrapped_tensor
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # pragma: no cover - older or stripped builds
    retrieve_all_functorch_interpreters = None

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = _TRITON_DTYPES + (torch.float64,)
_TRITON_MAX_HEAD_DIM = 256


class JVPAttentionFunction(torch.autograd.Function):
    """Attention with a fused tangent. Inputs:

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv); q_dot, k_dot, v_dot: tangents shaped
    like them or None; mask: None or bool/float broadcastable to (B, Hq, Nq, Nk); is_causal;
    scale (float); backend ('triton' | 'reference'); keep_tangent_for_jvp: True when called
    under forward AD, so ``jvp`` can hand the fused tangent over (it is released there).

    Outputs: out (B, Hq, Nq, Dv); out_dot (same, or None without tangents), not
    differentiable; lse (B, Hq, Nq) float32/float64, not differentiable.
    """

    @staticmethod
    def forward(q, k, v, q_dot, k_dot, v_dot, mask, is_causal, scale, backend, keep_tangent_for_jvp):
        impl = implementation("jvp_attention", backend)
        return impl.jvp_attention_forward(q, k, v, q_dot, k_dot, v_dot, mask, is_causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, mask, is_causal, scale, backend, keep_tangent_for_jvp = inputs
        out, out_dot, lse = output
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.attrs = (is_causal, scale, backend)
        # Held only until `jvp` takes it; never saved for backward.
        ctx.out_dot = out_dot if keep_tangent_for_jvp else None
        if ctx.out_dot is None:
            # Should tangents reach the Function without being unpacked first, `jvp` recomputes.
            ctx.save_for_forward(q, k, v, mask)
        ctx.mark_non_differentiable(*(t for t in (out_dot, lse) if t is not None))

    @staticmethod
    def backward(ctx, grad_out, grad_out_dot, grad_lse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        is_causal, scale, backend = ctx.attrs
        if backend == "triton" and retrieve_all_functorch_interpreters is not None and any(
                is_functorch_wrapped_tensor(t) for t in (grad_out, q)):
            raise ValueError("torch.func.grad / vjp over jvp_attention's Triton backward is not supported "
                             "(its kernels need plain tensors): use .backward() or torch.autograd.grad, "
                             "or MEANFLOW_BACKEND=reference")
        impl = implementation("jvp_attention", backend)
        dq, dk, dv = impl.jvp_attention_backward(grad_out, q, k, v, out, lse, mask, is_causal, scale)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                None, None, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, *unused):
        out_dot, ctx.out_dot = ctx.out_dot, None
        if out_dot is None and any(t is not None for t in (q_t, k_t, v_t)):
            q, k, v, mask = ctx.saved_tensors
            is_causal, scale, backend = ctx.attrs
            impl = implementation("jvp_attention", backend)
            _, out_dot, _ = impl.jvp_attention_forward(q, k, v, q_t, k_t, v_t, mask, is_causal, scale)
        return out_dot, None, None


# autograd.Function.apply binds its arguments with inspect.signature(forward) at every call;
# a cached signature saves rebuilding it (tens of microseconds of host time per call).
JVPAttentionFunction.forward.__signature__ = inspect.signature(JVPAttentionFunction.forward)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_tangent(name: str, tangent: torch.Tensor | None, primal: torch.Tensor) -> None:
    if tangent is None:
        return
    if not isinstance(tangent, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(tangent).__name__}")
    if tangent.shape != primal.shape:
        raise ValueError(f"{name} must have the shape of its primal {tuple(primal.shape)}, "
                         f"got {tuple(tangent.shape)}")
    if tangent.dtype != primal.dtype:
        raise ValueError(f"{name} must have the dtype of its primal ({primal.dtype}), got {tangent.dtype}")
    if tangent.device != primal.device:
        raise ValueError(f"{name} must be on {primal.device}, got {tangent.device}")


def _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Checks SDPA-style arguments; returns (backend, scale, mask broadcastable to 4-D or None)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check_tensor(name, t)
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
        if t.device != q.device:
            raise ValueError(f"{name} must be on query's device {q.device}, got {t.device}")
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
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on query's device {q.device}, got {attn_mask.device}")
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
        if q.dtype not in _TRITON_DTYPES:
            raise ValueError(f"query dtype {q.dtype} is not supported by the Triton backend "
                             "(float16, bfloat16, float32); use MEANFLOW_BACKEND=reference")
        if max(q.shape[-1], v.shape[-1]) > _TRITON_MAX_HEAD_DIM:
            raise ValueError(f"head dims up to {_TRITON_MAX_HEAD_DIM} are supported by the Triton backend, "
                             f"got query {q.shape[-1]}, value {v.shape[-1]}")
    return backend, float(scale), attn_mask


def _nested_jvp_depth() -> int:
    """How many torch.func.jvp transforms are active around this call."""
    if retrieve_all_functorch_interpreters is None:
        return 0
    return sum(1 for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp)


def _absent_if_zero(tangent: torch.Tensor | None) -> torch.Tensor | None:
    """Forward AD's efficient zero tangents cost nothing: treat them as absent."""
    if tangent is not None and tangent._is_zerotensor():
        return None
    return tangent


def _last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read rows with unit stride; any other layout of the leading dims is fine."""
    if t is None or t.stride(-1) == 1 or t.numel() == 0:
        return t
    return t.contiguous()


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, attention runs in the autocast dtype, as SDPA does."""
    device = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else "cpu"
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t in tensors)
    return tensors


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
            No gradient or tangent flows to the mask.
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
    query, key, value = _autocast(query, key, value)
    backend, scale, mask = _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    tangents = tuple(_last_dim_contiguous(_absent_if_zero(fwAD.unpack_dual(t).tangent)) for t in (query, key, value))
    query, key, value = (_last_dim_contiguous(t) for t in (query, key, value))
    under_forward_ad = any(t is not None for t in tangents)
    if under_forward_ad and _nested_jvp_depth() > 1:
        raise ValueError("query/key/value carry tangents of nested torch.func.jvp transforms: jvp_attention's "
                         "tangent is computed outside autograd, so higher-order forward AD is not supported")
    out, _, _ = JVPAttentionFunction.apply(query, key, value, *tangents, mask, is_causal, scale, backend,
                                           under_forward_ad)
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
        _check_tensor(name.removesuffix("_dot"), primal)
        _check_tangent(name, tangent, primal)
    q, k, v, q_dot, k_dot, v_dot = _autocast(q, k, v, q_dot, k_dot, v_dot)
    backend, scale, mask = _validate(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa)
    tensors = [q, k, v, q_dot, k_dot, v_dot]
    squeeze = q.dim() == 3
    if squeeze:
        tensors = [None if t is None else t.unsqueeze(1) for t in tensors]
    tensors = [_last_dim_contiguous(t if i < 3 else _absent_if_zero(t)) for i, t in enumerate(tensors)]
    out, out_dot, _ = JVPAttentionFunction.apply(*tensors, mask, is_causal, scale, backend, False)
    if out_dot is None:
        out_dot = torch.zeros_like(out, requires_grad=False).detach()
    if squeeze:
        out, out_dot = out.squeeze(1), out_dot.squeeze(1)
    return out, out_dot
