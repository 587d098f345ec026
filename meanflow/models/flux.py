"""Forward-mode AD through diffusers' ``FluxTransformer2DModel``.

The stock FLUX attention ends in ``torch.nn.functional.scaled_dot_product_attention`` (through
diffusers' attention dispatcher). Its fused kernels have no forward-AD rule, so
``torch.func.jvp`` of the stock model raises unless the math backend is forced, and that
backend materialises (B, H, N, N) score tensors for the primal and again for the tangent.

``enable_jvp_attention`` swaps the processor of every attention layer of the model (the
double-stream ``transformer_blocks`` and the single-stream ``single_transformer_blocks``) for
:class:`JVPFluxAttnProcessor`. The processor does the FLUX attention computation (QKV
projections, per-head RMS norms of queries and keys, the text tokens put in front of the
image tokens, rotary embedding, attention, output projections) and routes the attention
core to ``meanflow.ops.jvp_attention`` whenever a forward-AD tangent is present. Then:

- ``torch.func.jvp`` and ``torch.autograd.forward_ad`` dual tensors work through the model
  and agree with the stock model run under ``sdpa_kernel(SDPBackend.MATH)``;
- the tangent of each attention call is computed in the same kernel as its output and is
  never recorded for backward;
- the plain forward (no tangents) is the stock computation, through diffusers' own
  dispatcher and whatever attention backend was configured there.

The tangent of the whole model output still carries autograd history when parameters
require grad: the tangents of the linear layers, norms and modulations are ordinary torch
ops. Detach it, as MeanFlow's stop-gradient does (``(u - u_tgt.detach())``).

diffusers is imported lazily, only for the plain path; this module itself imports without it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from meanflow.ops.jvp_attention import jvp_attention

# The fused projection of diffusers' fuse_qkv_projections() and the layers it concatenates, in
# order (those stay on the module, unread by its forward, until unfuse_projections()).
FUSED_PROJECTIONS = {"to_qkv": ("to_q", "to_k", "to_v"),
                     "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}

__all__ = [
    "JVPFluxAttnProcessor",
    "enable_jvp_attention",
    "disable_jvp_attention",
    "jvp_attention_enabled",
]

# Processors whose computation JVPFluxAttnProcessor reproduces (diffusers >= 0.35 names the
# first; earlier releases used the other two). Anything else (IP-Adapter processors, custom
# ones) would be silently dropped by a swap, so enable_jvp_attention refuses it.
_STOCK_PROCESSOR_NAMES = frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0", "FusedFluxAttnProcessor2_0"})


def _has_tangent(t: torch.Tensor) -> bool:
    return fwAD.unpack_dual(t).tangent is not None


def _apply_rope(x: torch.Tensor, rotary_emb) -> torch.Tensor:
    """FLUX's rotary embedding on interleaved pairs (x[2i], x[2i+1]), in (B, H, N, D) layout.

    Args:
        x: (B, H, N, D) queries or keys.
        rotary_emb: (cos, sin), each (N, D), as returned by diffusers' ``FluxPosEmbed``.

    Returns:
        (B, H, N, D) in x's dtype. The arithmetic is diffusers' ``apply_rotary_emb`` with
        ``use_real=True, use_real_unbind_dim=-1`` (computed in at least float32, cast back), so the
        plain forward is reproduced exactly.
    """
    if not isinstance(rotary_emb, (tuple, list)) or len(rotary_emb) != 2:
        raise ValueError("image_rotary_emb must be a (cos, sin) pair of (N, D) tensors, "
                         f"got {type(rotary_emb).__name__}")
    cos, sin = (f.to(x.device)[None, None] for f in rotary_emb)
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, N, D/2) each
    rotated = torch.stack((-odd, even), dim=-1).flatten(3)  # (..., -x[2i+1], x[2i], ...)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _key_padding_to_4d(mask: torch.Tensor | None, batch: int, n_keys: int) -> torch.Tensor | None:
    """Brings a FLUX ``attention_mask`` to SDPA form, broadcastable to (B, H, Nq, Nk).

    Accepted as diffusers' native attention backend reads it: a (B, Nk) key mask becomes
    (B, 1, 1, Nk); any other shape is taken as already broadcastable to (B, H, Nq, Nk). Bool
    masks keep True = attend; floating masks are added to the scores; integer masks (0/1, as
    tokenizers return them) are read as bool (nonzero = attend), where SDPA would refuse them.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        mask = mask != 0
    if mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] == n_keys:
        mask = mask[:, None, None, :]
    return mask


def _stock_attention(processor, query, key, value, attention_mask):
    """The stock attention core for (B, H, N, D) inputs and a mask in SDPA form (see
    :func:`_key_padding_to_4d`): diffusers' dispatcher (which takes (B, N, H, D)), or plain SDPA
    on diffusers releases without one. Returns (B, H, Nq, Dv)."""
    try:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
    except ImportError:  # diffusers < 0.35
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
    out = dispatch_attention_fn(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=attention_mask,
        backend=getattr(processor, "_attention_backend", None),
        parallel_config=getattr(processor, "_parallel_config", None),
    )
    return out.transpose(1, 2)


class JVPFluxAttnProcessor:
    """FLUX attention whose core works under forward-mode AD (``torch.func.jvp``, dual tensors).

    Computes what diffusers' ``FluxAttnProcessor`` computes. For the double-stream blocks
    (``attn.added_kv_proj_dim`` set) the text stream is projected by the ``add_*`` layers and
    put in front of the image stream: with T text and S image tokens, N = T + S. The
    single-stream blocks pass the already-concatenated sequence as ``hidden_states``.

    When any of the queries, keys or values carries a forward-AD tangent (or ``always_jvp``),
    attention runs through ``meanflow.ops.jvp_attention``, whose backend follows
    ``MEANFLOW_BACKEND``; the tangent of its output is computed in the same kernel and has no
    ``grad_fn``. Otherwise the stock dispatcher runs, with the attention backend diffusers was
    configured with, so the plain forward is unchanged.

    Args:
        always_jvp: route the plain forward through ``jvp_attention`` too (its backward is then
            ours as well); default False.
    """

    # Read by diffusers' ``set_attention_backend`` / context-parallel hooks; used on the plain path.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, always_jvp: bool = False):
        if not isinstance(always_jvp, bool):
            raise ValueError(f"always_jvp must be a bool, got {type(always_jvp).__name__}")
        self.always_jvp = always_jvp

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            attn: the ``FluxAttention`` module (projections, norms, ``head_dim``).
            hidden_states: (B, S, C) image tokens (double-stream) or (B, T + S, C) text and
                image tokens (single-stream).
            encoder_hidden_states: (B, T, C) text tokens (double-stream) or None.
            attention_mask: None, a (B, N) key mask, or a mask broadcastable to (B, H, N, N):
                bool (True = attend), 0/1 integers (nonzero = attend) or floating (added to the
                scores); the same on the plain and the forward-AD path.
            image_rotary_emb: (cos, sin), each (N, D), for all N = T + S tokens.

        Returns:
            double-stream: (image (B, S, C), text (B, T, C)), each through its output projection;
            single-stream: (B, N, H·D), the attention output before any projection.
        """
        query, key, value, enc_query, enc_key, enc_value = _qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        head_dim = getattr(attn, "head_dim", None) or key.shape[-1] // attn.heads

        # (B, S, H·D) -> (B, S, H, D); the norms act on the head dim.
        query, key, value = (t.unflatten(-1, (-1, head_dim)) for t in (query, key, value))
        query, key = _norm(attn, "norm_q", query), _norm(attn, "norm_k", key)
        if enc_query is not None:
            enc_query, enc_key, enc_value = (t.unflatten(-1, (-1, head_dim))
                                             for t in (enc_query, enc_key, enc_value))
            enc_query, enc_key = _norm(attn, "norm_added_q", enc_query), _norm(attn, "norm_added_k", enc_key)
            # Text tokens first: (B, T + S, H, D).
            query = torch.cat([enc_query, query], dim=1)
            key = torch.cat([enc_key, key], dim=1)
            value = torch.cat([enc_value, value], dim=1)

        # (B, N, H, D) -> (B, H, N, D), the layout of SDPA and jvp_attention (views, no copies).
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        if image_rotary_emb is not None:
            query, key = _apply_rope(query, image_rotary_emb), _apply_rope(key, image_rotary_emb)

        # One mask normalisation for both paths (0/1 integer masks would crash SDPA).
        mask = _key_padding_to_4d(attention_mask, query.shape[0], key.shape[2])
        if self.always_jvp or any(_has_tangent(t) for t in (query, key, value)):
            if getattr(self, "_parallel_config", None) is not None:
                raise ValueError("JVPFluxAttnProcessor: context parallelism (_parallel_config) is not "
                                 "supported under forward-mode AD")
            out = jvp_attention(query, key, value, attn_mask=mask)
        else:
            out = _stock_attention(self, query, key, value, mask)

        # (B, H, N, D) -> (B, N, H·D)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        n_text = encoder_hidden_states.shape[1]
        enc_out, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        out = attn.to_out[0](out.contiguous())
        out = attn.to_out[1](out)  # dropout
        enc_out = attn.to_add_out(enc_out.contiguous())
        return out, enc_out


def _norm(attn: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


def _qkv_projections(attn, hidden_states, encoder_hidden_states):
    """(q, k, v) of the image stream, each (B, S, H·D), and those of the text stream (B, T, H·D)
    or three Nones; fused ``to_qkv`` / ``to_added_qkv`` layers are used once fused."""
    fused = getattr(attn, "fused_projections", False)
    if fused and hasattr(attn, "to_qkv"):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    enc = (None, None, None)
    if encoder_hidden_states is not None:
        if fused and hasattr(attn, "to_added_qkv"):
            enc = tuple(attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
        elif getattr(attn, "added_kv_proj_dim", None) is not None:
            enc = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                   attn.add_v_proj(encoder_hidden_states))
    return (query, key, value) + enc


# --------------------------------------------------------------------------------------------
# Installing and removing the processor
# --------------------------------------------------------------------------------------------

def _attention_modules(transformer) -> dict[str, torch.nn.Module]:
    """{'<module path>.processor': attention module} for every module with an attention processor,
    keyed as diffusers' ``attn_processors`` keys them. Raises ValueError for anything else."""
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError("transformer must be a diffusers FluxTransformer2DModel (a torch.nn.Module), "
                         f"got {type(transformer).__name__}")
    modules = {
        f"{name}.processor": module for name, module in transformer.named_modules()
        if name and callable(getattr(module, "set_processor", None)) and hasattr(module, "processor")
    }
    if not modules:
        raise ValueError(f"transformer must be a diffusers FluxTransformer2DModel: the "
                         f"{type(transformer).__name__} given has no attention processors")
    return modules


def enable_jvp_attention(transformer: torch.nn.Module, *, always_jvp: bool = False) -> dict[str, object]:
    """Makes ``torch.func.jvp`` / forward-AD dual tensors work through a FLUX transformer.

    Every attention layer of ``transformer`` (the double-stream ``transformer_blocks`` and
    the single-stream ``single_transformer_blocks``) gets its own :class:`JVPFluxAttnProcessor`,
    which keeps the previous processor's diffusers attention backend for the plain forward.

    Args:
        transformer: a diffusers ``FluxTransformer2DModel`` (or a module made of FLUX attention
            layers) whose processors are diffusers' stock FLUX processors or ours.
        always_jvp: passed to :class:`JVPFluxAttnProcessor`.

    Returns:
        The previous processors, ``{'<module path>.processor': processor}`` as diffusers'
        ``attn_processors`` keys them: give it to :func:`disable_jvp_attention` (or to
        ``transformer.set_attn_processor``) to restore them.

    Raises:
        ValueError: naming ``transformer``, if it is not a module with FLUX attention layers, or if
            one of them has a processor this one cannot stand in for (IP-Adapter, custom).
    """
    modules = _attention_modules(transformer)
    for key, module in modules.items():
        processor = module.processor
        name = type(processor).__name__
        if not isinstance(processor, JVPFluxAttnProcessor) and name not in _STOCK_PROCESSOR_NAMES:
            raise ValueError(f"transformer: attention layer {key.removesuffix('.processor')!r} has a {name}; "
                             "only diffusers' FluxAttnProcessor can be replaced by JVPFluxAttnProcessor")
        has_projections = hasattr(module, "to_qkv") or all(
            hasattr(module, p) for p in ("to_q", "to_k", "to_v"))
        if not has_projections or not hasattr(module, "heads"):
            raise ValueError(f"transformer: attention layer {key.removesuffix('.processor')!r} "
                             f"({type(module).__name__}) is not a FLUX attention layer "
                             "(no to_q/to_k/to_v, heads)")

    previous = {}
    for key, module in modules.items():
        old = module.processor
        new = JVPFluxAttnProcessor(always_jvp=always_jvp)
        # Keep a backend chosen with diffusers' set_attention_backend for the plain forward.
        for attr in ("_attention_backend", "_parallel_config"):
            if getattr(old, attr, None) is not None:
                setattr(new, attr, getattr(old, attr))
        previous[key] = old
        module.set_processor(new)
    return previous


def disable_jvp_attention(transformer: torch.nn.Module, previous: Mapping[str, object]) -> None:
    """Puts back the processors that :func:`enable_jvp_attention` returned.

    Args:
        transformer: the model given to :func:`enable_jvp_attention`.
        previous: its return value, ``{'<module path>.processor': processor}``.

    Raises:
        ValueError: naming ``previous``, if it is not a mapping or names a layer the model lacks.
    """
    modules = _attention_modules(transformer)
    if not isinstance(previous, Mapping):
        raise ValueError("previous must be the dict enable_jvp_attention returned, "
                         f"got {type(previous).__name__}")
    unknown = sorted(set(previous) - set(modules))
    if unknown:
        raise ValueError(f"previous names attention layers that transformer lacks: {unknown[:3]}")
    for key, processor in previous.items():
        modules[key].set_processor(processor)


@contextlib.contextmanager
def jvp_attention_enabled(
    transformer: torch.nn.Module, *, always_jvp: bool = False
) -> Iterator[dict[str, object]]:
    """``with jvp_attention_enabled(model): out, tangent = torch.func.jvp(...)``; the previous
    processors are restored on exit (also on error). Yields what enable_jvp_attention returns."""
    previous = enable_jvp_attention(transformer, always_jvp=always_jvp)
    try:
        yield previous
    finally:
        disable_jvp_attention(transformer, previous)
