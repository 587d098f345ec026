"""jvp_attention_varlen (packed sequences) against math SDPA run on each sequence alone, in float64.

The oracle never packs: it slices each sequence out, runs math SDPA under torch.func.jvp on it as
a batch of one, and concatenates. Both backends; Triton through the interpreter on the CPU (fp32,
fp16), with its outputs NaN-poisoned so unwritten rows fail.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow.ops import jvp_attention_varlen, jvp_attention_varlen_pair
from meanflow.testing import assert_close_to_oracle, assert_gpu_errors, backend_dtypes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class Packed:
    query_lengths: tuple[int, ...] = (5, 37, 1, 70)
    key_lengths: tuple[int, ...] | None = None  # None: the query lengths (self-attention)
    q_heads: int = 2
    kv_heads: int = 2
    head_dim: int = 32
    value_dim: int = 32
    is_causal: bool = False

    @property
    def keys(self) -> tuple[int, ...]:
        return self.query_lengths if self.key_lengths is None else self.key_lengths

    def cu_seqlens(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                     for lengths in (self.query_lengths, self.keys))

    def inputs(self, dtype):
        def randn(*shape):
            return torch.randn(*shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)

        tq, tk = sum(self.query_lengths), sum(self.keys)
        primals = (randn(tq, self.q_heads, self.head_dim), randn(tk, self.kv_heads, self.head_dim),
                   randn(tk, self.kv_heads, self.value_dim))
        return primals, tuple(torch.randn_like(t) for t in primals), randn(tq, self.q_heads, self.value_dim)


CASES = {
    "ragged": Packed(),
    "cross_and_empty": Packed(query_lengths=(9, 0, 40, 33), key_lengths=(70, 5, 0, 33)),  # q ≠ k, empty ones
    "causal_gqa": Packed(query_lengths=(45, 3, 64), q_heads=4, kv_heads=2, is_causal=True),
    "value_dim_72": Packed(query_lengths=(50, 17), head_dim=16, value_dim=72, kv_heads=1, q_heads=3),
    "one_sequence": Packed(query_lengths=(77,)),
}


def _jvp_and_grads(attention, primals, tangents, grad_out):
    primals = tuple(p.detach().requires_grad_() for p in primals)
    out, out_dot = torch.func.jvp(attention, primals, tangents)
    present = [p for p in primals if p.numel()]
    grads = iter(torch.autograd.grad(out, present, grad_out, allow_unused=True))
    return (out, out_dot, *(next(grads) if p.numel() else torch.zeros_like(p) for p in primals))


def _per_sequence_math_sdpa(case: Packed, primals, tangents, grad_out):
    """(out, out_dot, dq, dk, dv) with every sequence attended alone by math SDPA."""
    cu_q, cu_k = (cu.tolist() for cu in case.cu_seqlens())
    group = case.q_heads // case.kv_heads

    def attention(q, k, v):
        outs = []
        for i in range(len(case.query_lengths)):
            qi = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None]
            ki, vi = (t[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None].repeat_interleave(group, 1) for t in (k, v))
            if ki.shape[2] == 0:  # no key at all: zeros, as SDPA gives rows that see none
                outs.append(q.new_zeros(qi.shape[2], case.q_heads, case.value_dim) + 0 * (qi.sum() + vi.sum()))
                continue
            with sdpa_kernel(SDPBackend.MATH):
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=case.is_causal)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    return _jvp_and_grads(attention, primals, tangents, grad_out)


@pytest.mark.parametrize("case_name", list(CASES))
def test_varlen_matches_math_sdpa_on_each_sequence(backend, case_name):
    case = CASES[case_name]
    cu_q, cu_k = case.cu_seqlens()
    for dtype in backend_dtypes(backend):
        primals, tangents, grad_out = case.inputs(dtype)
        ours = _jvp_and_grads(
            lambda q, k, v: jvp_attention_varlen(q, k, v, cu_q, cu_k, is_causal=case.is_causal,
                                                 enable_gqa=case.q_heads != case.kv_heads),
            primals, tangents, grad_out)
        oracle = _per_sequence_math_sdpa(case, tuple(p.double() for p in primals),
                                         tuple(t.double() for t in tangents), grad_out.double())
        baseline = None if dtype == torch.float64 else _per_sequence_math_sdpa(case, primals, tangents, grad_out)
        for i, name in enumerate(("out", "out_dot", "dq", "dk", "dv")):
            assert ours[i].dtype == dtype
            assert_close_to_oracle(f"{name} ({dtype})", ours[i], oracle[i], None if baseline is None else baseline[i])


@pytest.mark.parametrize("path", ["per_sequence", "masked"])
@pytest.mark.parametrize("case_name", ["cross_and_empty", "causal_gqa"])
def test_reference_paths_match_math_sdpa_on_each_sequence(monkeypatch, case_name, path):
    """The reference attends each sequence alone when it can read the offsets (Σ nᵢ² work), else
    (fake tensors while tracing) every query against every key under the sequence mask: both
    give the oracle's numbers, and the per-sequence one never builds a packed score block."""
    from meanflow.reference import jvp_attention as reference

    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    packed_blocks, real_scores = [], reference._masked_scores

    def scores(q, k_chunk, mask, is_causal, scale, key_start, sequences=None):
        packed_blocks.append(sequences is not None)  # a score block over several sequences
        return real_scores(q, k_chunk, mask, is_causal, scale, key_start, sequences)

    monkeypatch.setattr(reference, "_masked_scores", scores)
    if path == "masked":
        monkeypatch.setattr(reference, "_host_sequences", lambda cu_q, cu_k: None)
    case = CASES[case_name]
    cu_q, cu_k = case.cu_seqlens()
    primals, tangents, grad_out = case.inputs(torch.float64)
    ours = _jvp_and_grads(lambda q, k, v: jvp_attention_varlen(q, k, v, cu_q, cu_k, is_causal=case.is_causal,
                                                               enable_gqa=case.q_heads != case.kv_heads),
                          primals, tangents, grad_out)
    oracle = _per_sequence_math_sdpa(case, primals, tangents, grad_out)
    for i, name in enumerate(("out", "out_dot", "dq", "dk", "dv")):
        assert_close_to_oracle(name, ours[i], oracle[i], None)
    assert any(packed_blocks) == (path == "masked") and packed_blocks


def test_triton_writes_the_packed_layout(monkeypatch, poison_empty):
    """The kernels write out, out_dot and the gradients as (T, H, D) rows, the layout they came in
    (no copy when a caller flattens the heads)."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    case = CASES["causal_gqa"]
    (q, k, v), (tq, tk, tv), grad_out = case.inputs(torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, out_dot = jvp_attention_varlen_pair(q, k, v, tq, tk, tv, *case.cu_seqlens(), enable_gqa=True,
                                             is_causal=True)
    out.backward(grad_out)
    for t in (out, out_dot, q.grad, k.grad, v.grad):
        assert t.is_contiguous(), t.stride()


def test_pair_form_matches_func_jvp_and_is_detached(backend):
    case = CASES["cross_and_empty"]
    cu = case.cu_seqlens()
    (q, k, v), (tq, tk, tv), _ = case.inputs(torch.float32)
    out, out_dot = torch.func.jvp(lambda a, b, c: jvp_attention_varlen(a, b, c, *cu), (q, k, v), (tq, tk, tv))
    q.requires_grad_()
    pair_out, pair_dot = jvp_attention_varlen_pair(q, k, v, tq, tk, tv, *cu)
    torch.testing.assert_close(pair_out, out)
    torch.testing.assert_close(pair_dot, out_dot)
    assert pair_out.grad_fn is not None and pair_dot.grad_fn is None
    # Tangents of a subset: here only v's, whose tangent is P·V̇ per sequence.
    _, v_only = jvp_attention_varlen_pair(q, k, v, None, None, tv, *cu)
    _, v_only_jvp = torch.func.jvp(lambda c: jvp_attention_varlen(q.detach(), k, c, *cu), (v,), (tv,))
    torch.testing.assert_close(v_only, v_only_jvp)
    _, none = jvp_attention_varlen_pair(q, k, v, None, None, None, *cu)
    assert not none.any()


def test_forward_ad_dual_tensors_match_func_jvp(backend):
    case = CASES["ragged"]
    cu = case.cu_seqlens()
    primals, tangents, _ = case.inputs(torch.float32)
    _, expected = torch.func.jvp(lambda a, b, c: jvp_attention_varlen(a, b, c, *cu, is_causal=True), primals,
                                 tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        tangent = fwAD.unpack_dual(jvp_attention_varlen(*duals, *cu, is_causal=True)).tangent
    torch.testing.assert_close(tangent, expected)


def test_offsets_on_the_cpu_and_a_larger_max_seqlen_change_nothing(backend):
    case = CASES["ragged"]
    cu_q, cu_k = case.cu_seqlens()
    primals, _, _ = case.inputs(torch.float32)
    expected = jvp_attention_varlen(*primals, cu_q, cu_k)
    given = jvp_attention_varlen(*primals, cu_q.cpu().long(), cu_k.cpu().long(), max_seqlen_q=100, max_seqlen_k=71)
    torch.testing.assert_close(given, expected, rtol=0, atol=0)


def test_strided_offsets_are_read_by_value(backend):
    """int32 offsets that are a strided view (every other element of a longer tensor) give what
    their contiguous copy gives, forward and backward: the kernels read offsets at unit stride."""
    case = CASES["cross_and_empty"]
    primals, _, grad_out = case.inputs(torch.float32)
    results = []
    for cu_q, cu_k in (case.cu_seqlens(), tuple(torch.stack([cu, torch.full_like(cu, 99)], 1).flatten()[::2]
                                               for cu in case.cu_seqlens())):
        leaves = tuple(p.detach().requires_grad_() for p in primals)
        out = jvp_attention_varlen(*leaves, cu_q, cu_k)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    assert results[1][0].shape == results[0][0].shape
    for expected, given in zip(*results):
        torch.testing.assert_close(given, expected, rtol=0, atol=0)


def test_compiled_repeats_eager():
    """torch.compile runs it, with a graph break at the host check of the offsets (their values
    decide what is valid, which a graph cannot guard on)."""
    case = CASES["causal_gqa"]
    (q, k, v), _, grad_out = case.inputs(torch.float32)

    def loss(q, k, v, cu_q, cu_k):
        return (jvp_attention_varlen(q, k, v, cu_q, cu_k, is_causal=True, enable_gqa=True) * grad_out).sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager")):
        primals = tuple(t.detach().requires_grad_() for t in (q, k, v))
        value = fn(*primals, *case.cu_seqlens())
        results.append((value, *torch.autograd.grad(value, primals)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def _packed_qkv(tokens=(3, 4), heads=2, dim=8):
    total = sum(tokens)
    q, k, v = (torch.randn(total, heads, dim) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(tokens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v, cu: (q[None], k, v, cu, cu), "query must be packed"),
    (lambda q, k, v, cu: (q, k, v[:-1], cu, cu), "value has 6 tokens and key 7"),
    (lambda q, k, v, cu: (q, k, v, cu.float(), cu), "cu_seqlens_q must be a 1-D int32 or int64"),
    (lambda q, k, v, cu: (q, k, v, cu, cu[None]), "cu_seqlens_k must be a 1-D"),
    (lambda q, k, v, cu: (q, k, v, cu[:1], cu), "cu_seqlens_q must be a 1-D"),
    (lambda q, k, v, cu: (q, k, v, [0, 3, 7], cu), "cu_seqlens_q must be a torch.Tensor"),
    (lambda q, k, v, cu: (q, k, v, cu + 1, cu), "must rise from 0"),
    (lambda q, k, v, cu: (q, k, v, cu, torch.tensor([0, 5, 4, 7], dtype=torch.int32)), "never falling"),
    (lambda q, k, v, cu: (q, k, v, cu, torch.tensor([0, 3, 6], dtype=torch.int32)), "to the 7 packed tokens"),
    (lambda q, k, v, cu: (q, k, v, cu, torch.tensor([0, 7], dtype=torch.int32)), "one key sequence per query"),
], ids=["query_4d", "value_tokens", "float_offsets", "offsets_2d", "one_offset", "list_offsets", "not_from_zero",
        "falling", "short_of_total", "sequence_counts"])
def test_bad_arguments_raise_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        jvp_attention_varlen(*change(*_packed_qkv()))


def test_bad_max_seqlen_and_heads_raise_value_error():
    q, k, v, cu = _packed_qkv()
    with pytest.raises(ValueError, match=r"max_seqlen_q must be an int of at least the longest sequence \(4\)"):
        jvp_attention_varlen(q, k, v, cu, cu, max_seqlen_q=3)
    with pytest.raises(ValueError, match="max_seqlen_k must be an int"):
        jvp_attention_varlen(q, k, v, cu, cu, max_seqlen_k=4.0)
    with pytest.raises(ValueError, match="enable_gqa"):
        jvp_attention_varlen(q, k[:, :1], v[:, :1], cu, cu)
    with pytest.raises(ValueError, match="is_causal must be a bool"):
        jvp_attention_varlen(q, k, v, cu, cu, is_causal=1)


GPU_CASES = {
    "flux_mixed": Packed(query_lengths=(4608, 1536, 777), q_heads=8, kv_heads=8, head_dim=128, value_dim=128),
    "causal_gqa_cross": Packed(query_lengths=(1000, 129, 2048), key_lengths=(1031, 300, 2048), q_heads=8,
                               kv_heads=2, head_dim=72, value_dim=72, is_causal=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case_name", list(GPU_CASES))
def test_gpu_varlen_against_float64(monkeypatch, case_name, dtype):
    """Relative errors of the kernels in 16 bits within twice math SDPA's own (run per sequence in
    the same dtype), against float64; printed as GPU-ERR lines for bench/gpu_check.sh."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    case = GPU_CASES[case_name]
    cu_q, cu_k = case.cu_seqlens()
    primals, tangents, grad_out = case.inputs(dtype)
    ours = _jvp_and_grads(
        lambda q, k, v: jvp_attention_varlen(q, k, v, cu_q, cu_k, is_causal=case.is_causal,
                                             enable_gqa=case.q_heads != case.kv_heads),
        primals, tangents, grad_out)
    oracle = _per_sequence_math_sdpa(case, tuple(p.double() for p in primals), tuple(t.double() for t in tangents),
                                     grad_out.double())
    baseline = _per_sequence_math_sdpa(case, primals, tangents, grad_out)
    assert_gpu_errors(f"varlen_{case_name}", dtype, ("out", "out_dot", "dq", "dk", "dv"), ours, oracle,
                      baseline)
