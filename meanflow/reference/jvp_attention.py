"""Plain-torch reference for ``jvp_attention``: the test oracle and the CPU path.

The math (DESIGN §3), per head, with s the softmax scale, M the additive mask (−inf where
masked) and tangents written with a dot:

    S  = s·Q Kᵀ + M                 P = softmax_row(S)          O = P V
    Ṡ  = s·(Q̇ Kᵀ + Q K̇ᵀ)            μ = Σ_j P ⊙ Ṡ  (the tangent of the row log-sum-exp)
    Ȯ  = P V̇ + (P ⊙ Ṡ) V − μ·O

Both passes walk the keys in chunks with an online softmax, so memory is O(Nq·chunk), never
Nq×Nk: the running max m, sum l and the accumulators Σ P̃V, Σ (P̃V̇ + (P̃⊙Ṡ)V), Σ P̃⊙Ṡ are all
rescaled by the same factor exp(m_old − m_new) because Ṡ does not enter the max.

Fully masked rows give O = 0, Ȯ = 0 and zero gradients, as SDPA does; their log-sum-exp is
stored as +inf so that the backward's exp(S − lse) is 0 there.

Packed sequences (``cu_seqlens_q`` / ``cu_seqlens_k``) are attended one at a time, each as a
batch of one, so the cost is Σ nᵢ², not (Σ nᵢ)², whenever the offsets can be read on the host.
Where they cannot (fake tensors while torch.compile traces, for the output shapes), every query
meets every key under a mask that keeps its own sequence's: the same result, at the packed cost.

Finite additive mask values below ``MASK_FLOOR`` (−1e4) count as ``MASK_FLOOR``; −inf stays −inf.
Beside any key within 1e4 of the row's best, such a key's weight exp(−1e4 + ...) is exactly 0 in
every float format, so nothing changes. A row whose every key is that low (padding masked with
−1e9 or ``finfo.min``, the usual idiom) gets softmax(S − M), what a constant mask means. Unclamped,
S = s·QKᵀ − 1e9 keeps no digit of s·QKᵀ in float32 (the spacing of floats there is 64), the
log-sum-exp m + log l rounds to m, and the backward's exp(S − lse) gives every key weight 1
instead of the forward's 1/Nk; ``finfo.min`` overflows to −inf once scaled to base 2.

Shapes: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) with Hq a multiple of Hk
(query head h reads key/value head h // (Hq // Hk)); ``mask`` None or a bool / float tensor
broadcastable to (B, Hq, Nq, Nk) (bool: True = attend; float: added to the scores).
Computation runs in float32 for 16-bit inputs and in the input dtype otherwise.
"""
from __future__ import annotations

import math

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch._subclasses.fake_tensor import is_fake

# Elements per (B·H·Nq × chunk) score buffer: 2^22 float32 is 16 MiB; a JVP step holds about
# four such buffers, which keeps the reference far below 200 MiB of extra memory.
_CHUNK_ELEMENTS = 1 << 22

MASK_FLOOR = -1e4  # the lowest finite value an additive mask takes (see above); the kernels share it


def floored_mask(mask: torch.Tensor) -> torch.Tensor:
    """An additive mask with finite values below MASK_FLOOR raised to it; −inf and NaN kept."""
    return torch.where(mask < MASK_FLOOR, torch.where(mask == float("-inf"), mask, MASK_FLOOR), mask)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _key_chunk(batch_rows: int, n_keys: int) -> int:
    return max(16, min(n_keys, _CHUNK_ELEMENTS // max(batch_rows, 1)))


def _group(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per key/value head (1 with zero heads: empty outputs, as SDPA)."""
    return q.shape[1] // k.shape[1] if k.shape[1] else 1


def _repeat_kv(x: torch.Tensor | None, group: int) -> torch.Tensor | None:
    """(B, Hk, N, D) -> (B, Hk·group, N, D), query head h reading key head h // group."""
    if x is None or group == 1:
        return x
    return x.repeat_interleave(group, dim=1)


def _sum_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Hk·group, N, D) -> (B, Hk, N, D): gradients of the shared key/value heads."""
    if group == 1:
        return x
    b, h, n, d = x.shape
    return x.view(b, h // group, group, n, d).sum(2)


def _sequences(cu_seqlens: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position within it) of each of n_rows packed rows, int64 (n_rows,), from
    cu_seqlens (S + 1,): sequence i holds rows cu_seqlens[i] .. cu_seqlens[i + 1] − 1. Device ops
    only (no host read), so it also runs on fake tensors (``_host_sequences`` gives None)."""
    rows = torch.arange(n_rows, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.int64)
    index = torch.searchsorted(cu[1:], rows, right=True)
    return index, rows - cu[index]


def _host_sequences(cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                    ) -> list[tuple[int, int, int, int]] | None:
    """[(first query, end, first key, end)] of each packed sequence, read on the host; None when
    not packed, or when the offsets have no values to read (fake or meta tensors, a graph being
    traced): the masked path then, which needs no host read."""
    if cu_seqlens_q is None:
        return None
    if torch.compiler.is_compiling() or any(
            is_fake(cu) or cu.is_meta or is_functorch_wrapped_tensor(cu) for cu in (cu_seqlens_q, cu_seqlens_k)):
        return None
    q_offsets, k_offsets = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return list(zip(q_offsets, q_offsets[1:], k_offsets, k_offsets[1:]))


def _rows(t: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    return None if t is None else t[..., start:end, :]


def _masked_scores(
    q: torch.Tensor,
    k_chunk: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    key_start: int,
    sequences: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Scaled scores s·Q Kᵀ with the mask and causal rule applied: (B, H, Nq, chunk).
    ``sequences``: packed sequences, (index, position) of the queries and then of every key
    (``_sequences``): a query sees the keys of its own sequence only, causal within it."""
    scores = torch.matmul(q, k_chunk.transpose(-1, -2)) * scale
    key_end = key_start + k_chunk.shape[-2]
    if mask is not None:
        m = mask[..., key_start:key_end]
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + floored_mask(m.to(scores.dtype))
    if sequences is None:
        rows = torch.arange(q.shape[-2], device=q.device)[:, None]
        cols = torch.arange(key_start, key_end, device=q.device)[None, :]
    else:
        seq_q, rows, seq_k, cols = sequences
        rows, cols = rows[:, None], cols[None, key_start:key_end]
        scores = scores.masked_fill(seq_q[:, None] != seq_k[None, key_start:key_end], float("-inf"))
    if is_causal:
        # Top-left alignment, as SDPA: query i sees keys j <= i.
        scores = scores.masked_fill(cols > rows, float("-inf"))
    return scores


def _packed(cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, n_queries: int,
            n_keys: int) -> tuple[torch.Tensor, ...] | None:
    """``_masked_scores``'s sequences of packed rows, or None."""
    if cu_seqlens_q is None:
        return None
    return (*_sequences(cu_seqlens_q, n_queries), *_sequences(cu_seqlens_k, n_keys))


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
    """Attention output, its tangent and the row log-sum-exp, chunked over keys.

    Args:
        q, k, v: (B, Hq, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv); one floating dtype.
        q_dot, k_dot, v_dot: tangents shaped like q, k, v, or None for a zero tangent.
        mask: None, or bool / float broadcastable to (B, Hq, Nq, Nk).
        is_causal: top-left causal masking (per sequence when packed).
        scale: softmax scale, default 1/sqrt(D).
        cu_seqlens_q, cu_seqlens_k: None, or packed sequences (B = 1): integer (S + 1,), the first
            row of each sequence and then Nq (Nk); a query attends to its own sequence's keys.
        max_seqlen_q, max_seqlen_k: the kernels' grid sizes; unused here.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype; out_dot (same) or None when every tangent is None;
        lse (B, Hq, Nq) float32 or float64, +inf on fully masked rows.
    """
    sequences = _host_sequences(cu_seqlens_q, cu_seqlens_k)
    if sequences is not None:
        parts = [jvp_attention_forward(_rows(q, a, b), _rows(k, c, d), _rows(v, c, d), _rows(q_dot, a, b),
                                       _rows(k_dot, c, d), _rows(v_dot, c, d), is_causal=is_causal, scale=scale)
                 for a, b, c, d in sequences]
        out, out_dot, lse = (None if part[0] is None else torch.cat(part, dim) for part, dim
                             in zip(zip(*parts), (-2, -2, -1)))
        return out, out_dot, lse
    dtype = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = _group(q, k)
    with torch.no_grad():
        qc = q.to(dtype)
        kc, vc = (_repeat_kv(t.to(dtype), group) for t in (k, v))
        tq, tk, tv = (None if t is None else t.to(dtype) for t in (q_dot, k_dot, v_dot))
        tk, tv = _repeat_kv(tk, group), _repeat_kv(tv, group)
        has_tangent = tq is not None or tk is not None or tv is not None
        has_score_tangent = tq is not None or tk is not None

        b, h, nq, _ = qc.shape
        nk, dv = kc.shape[-2], vc.shape[-1]
        if mask is not None:
            mask = mask.expand(b, h, nq, nk)
        row_max = qc.new_full((b, h, nq), float("-inf"))
        row_sum = qc.new_zeros((b, h, nq))
        acc = qc.new_zeros((b, h, nq, dv))
        acc_dot = qc.new_zeros((b, h, nq, dv)) if has_tangent else None
        lse_dot = qc.new_zeros((b, h, nq)) if has_tangent else None

        sequences = _packed(cu_seqlens_q, cu_seqlens_k, nq, nk)
        chunk = _key_chunk(b * h * nq, nk)
        for start in range(0, nk, chunk):
            end = min(start + chunk, nk)
            scores = _masked_scores(qc, kc[..., start:end, :], mask, is_causal, scale, start, sequences)
            new_max = torch.maximum(row_max, scores.amax(-1))
            # A row with nothing visible yet keeps max −inf; exponentiate against 0 there.
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            alpha = torch.exp(row_max - safe_max)
            p = torch.exp(scores - safe_max[..., None])
            row_sum = row_sum * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vc[..., start:end, :]
            if has_tangent:
                acc_dot = acc_dot * alpha[..., None]
                if tv is not None:
                    acc_dot = acc_dot + p @ tv[..., start:end, :]
                if has_score_tangent:
                    score_dot = torch.zeros_like(p)
                    if tq is not None:
                        score_dot = score_dot + tq @ kc[..., start:end, :].transpose(-1, -2)
                    if tk is not None:
                        score_dot = score_dot + qc @ tk[..., start:end, :].transpose(-1, -2)
                    p_score_dot = p * (score_dot * scale)
                    lse_dot = lse_dot * alpha + p_score_dot.sum(-1)
                    acc_dot = acc_dot + p_score_dot @ vc[..., start:end, :]
            row_max = new_max

        empty = row_sum == 0
        denom = torch.where(empty, torch.ones_like(row_sum), row_sum)
        out = acc / denom[..., None]
        lse = torch.where(empty, torch.full_like(row_sum, float("inf")), row_max + torch.log(denom))
        out_dot = None
        if has_tangent:
            mu = lse_dot / denom
            out_dot = (acc_dot / denom[..., None] - mu[..., None] * out).to(q.dtype)
    return out.to(q.dtype), out_dot, lse


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
    """Gradients of the primal output (FlashAttention-2 style, from the saved lse).

    With P = exp(S − lse) recomputed per key chunk and Δ = rowsum(dO ⊙ O):
    dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − Δ), dQ = s·dS K, dK = s·dSᵀ Q.

    Args:
        grad_out, out: (B, Hq, Nq, Dv); q, k, v, mask and the packed sequences as in
        ``jvp_attention_forward``; lse: (B, Hq, Nq) from the forward.

    Returns:
        dq, dk, dv shaped and typed like q, k, v.
    """
    sequences = _host_sequences(cu_seqlens_q, cu_seqlens_k)
    if sequences is not None:
        # The sequences' keys tile [0, Nk) in order, so the key gradients concatenate too.
        parts = [jvp_attention_backward(_rows(grad_out, a, b), _rows(q, a, b), _rows(k, c, d), _rows(v, c, d),
                                        _rows(out, a, b), lse[..., a:b], is_causal=is_causal, scale=scale)
                 for a, b, c, d in sequences]
        dq, dk, dv = (torch.cat(grads, -2) for grads in zip(*parts))
        return dq, dk, dv
    dtype = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = _group(q, k)
    with torch.no_grad():
        qc, do = q.to(dtype), grad_out.to(dtype)
        kc, vc = (_repeat_kv(t.to(dtype), group) for t in (k, v))
        b, h, nq, _ = qc.shape
        nk = kc.shape[-2]
        if mask is not None:
            mask = mask.expand(b, h, nq, nk)
        delta = (do * out.to(dtype)).sum(-1, keepdim=True)
        lse = lse.to(dtype)[..., None]
        # Out of place: under torch.func.vmap over this backward (jacrev) grad_out is batched and
        # the saved tensors are not, and a batched value cannot be written into them.
        dq, dk_chunks, dv_chunks = torch.zeros_like(qc), [], []
        sequences = _packed(cu_seqlens_q, cu_seqlens_k, nq, nk)
        chunk = _key_chunk(b * h * nq, nk)
        for start in range(0, nk, chunk):
            end = min(start + chunk, nk)
            p = torch.exp(_masked_scores(qc, kc[..., start:end, :], mask, is_causal, scale, start, sequences) - lse)
            dv_chunks.append(p.transpose(-1, -2) @ do)
            ds = p * (do @ vc[..., start:end, :].transpose(-1, -2) - delta)
            dq = dq + (ds @ kc[..., start:end, :]) * scale
            dk_chunks.append((ds.transpose(-1, -2) @ qc) * scale)
        dk = torch.cat(dk_chunks, -2) if dk_chunks else torch.zeros_like(kc)
        dv = torch.cat(dv_chunks, -2) if dv_chunks else torch.zeros_like(vc)
        dk, dv = _sum_groups(dk, group), _sum_groups(dv, group)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
