"""jvp_attention against math SDPA in float64: primal, tangent and gradients, both backends.

On a CPU-only machine the Triton backend runs through the interpreter (fp32, fp16; its bf16
products are wrong, so bf16 kernels are checked by the `gpu` tests).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow.ops import jvp_attention, jvp_attention_pair
from meanflow.reference.jvp_attention import floored_mask
from meanflow.testing import assert_close_to_oracle, assert_gpu_errors, backend_dtypes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
INTERPRETED_DTYPES = [torch.float32, torch.float16]


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 1
    q_heads: int = 2
    kv_heads: int = 2
    n_queries: int = 37
    n_keys: int = 51
    head_dim: int = 32
    value_dim: int = 32
    is_causal: bool = False
    mask: str = "none"  # none | keys | bool | additive | additive2d | empty_rows | ramp
    scale: float | None = None
    std: float = 1.0
    grad_ratio: float = 2.0  # how far the gradients may be from float64, in multiples of math SDPA's error

    def inputs(self, dtype, device=DEVICE):
        def randn(*shape):
            return (torch.randn(*shape, dtype=torch.float64) * self.std).to(device=device, dtype=dtype)

        q = randn(self.batch, self.q_heads, self.n_queries, self.head_dim)
        k = randn(self.batch, self.kv_heads, self.n_keys, self.head_dim)
        v = randn(self.batch, self.kv_heads, self.n_keys, self.value_dim)
        tangents = tuple(torch.randn_like(t) for t in (q, k, v))
        return (q, k, v), tangents, self.attn_mask(dtype, device)

    def attn_mask(self, dtype, device=DEVICE):
        b, h, nq, nk = self.batch, self.q_heads, self.n_queries, self.n_keys
        if self.mask == "none":
            return None
        if self.mask == "keys":  # key padding: (B, 1, 1, Nk), at least one visible key
            mask = torch.rand(b, 1, 1, nk) > 0.4
            mask[..., 0] = True
        elif self.mask == "bool":
            mask = torch.rand(b, h, nq, nk) > 0.3
        elif self.mask == "additive":
            mask = torch.randn(b, h, nq, nk).to(dtype)
        elif self.mask == "additive2d":  # broadcast over batch and heads, −inf entries
            mask = torch.randn(nq, nk).masked_fill(torch.rand(nq, nk) > 0.7, float("-inf")).to(dtype)
        elif self.mask == "empty_rows":  # some rows see no key at all
            mask = torch.rand(b, 1, nq, nk) > 0.3
            mask[:, :, ::3, :] = False
        elif self.mask.startswith("padding_rows"):  # rows masked whole with a large finite value
            fill = {"padding_rows_1e9": -1e9, "padding_rows_min": torch.finfo(dtype).min,
                    "padding_rows_1e30": -1e30}[self.mask]
            mask = torch.randn(b, h, nq, nk, dtype=torch.float64)
            mask[..., 1::3, :] = fill
            if self.mask == "padding_rows_1e30":  # every row: whole query blocks with no finite score
                mask[:] = fill
            mask = mask.to(dtype)
        elif self.mask == "ramp":  # scores that climb along the keys (even rows) or fall (odd rows)
            climb = 40.0 * torch.arange(nk, dtype=torch.float64) / nk
            mask = torch.where(torch.arange(nq)[:, None] % 2 == 0, climb, climb.flip(0)).to(dtype)
        else:
            raise AssertionError(self.mask)
        return mask.to(device)

    def kwargs(self, mask):
        return dict(attn_mask=mask, is_causal=self.is_causal, scale=self.scale, enable_gqa=self.q_heads != self.kv_heads)

    def sdpa_kwargs(self, mask, dtype):
        """SDPA's arguments in `dtype`; SDPA refuses a mask with is_causal, so merge the two."""
        kwargs = self.kwargs(mask)
        if mask is None:
            return kwargs
        if mask.dtype != torch.bool:  # the floor jvp_attention documents for large finite values
            mask = floored_mask(mask.to(dtype))
        if self.is_causal:
            visible = torch.ones(self.n_queries, self.n_keys, dtype=torch.bool, device=mask.device).tril()
            mask = mask & visible if mask.dtype == torch.bool else mask.masked_fill(~visible, float("-inf"))
            kwargs["is_causal"] = False
        kwargs["attn_mask"] = mask
        return kwargs


CASES = {
    "square": Case(batch=2, n_queries=64, n_keys=64),
    "ragged_dv": Case(q_heads=3, kv_heads=3, head_dim=24, value_dim=40),
    "more_queries": Case(batch=2, n_queries=70, n_keys=19, head_dim=16, value_dim=16),
    "gqa_d48": Case(q_heads=4, kv_heads=2, n_queries=33, n_keys=45, head_dim=48, value_dim=48),
    "mqa_d72": Case(q_heads=3, kv_heads=1, n_queries=20, n_keys=29, head_dim=72, value_dim=72),
    "d96": Case(q_heads=1, kv_heads=1, n_queries=17, n_keys=65, head_dim=96, value_dim=96),
    "single_token": Case(q_heads=1, kv_heads=1, n_queries=1, n_keys=1, head_dim=16, value_dim=16),
    "causal": Case(is_causal=True),
    "causal_more_queries": Case(n_queries=60, n_keys=23, is_causal=True),
    "key_padding": Case(batch=2, mask="keys"),
    "bool_mask": Case(mask="bool"),
    "additive_mask": Case(mask="additive", scale=0.3),
    "additive_2d_inf": Case(mask="additive2d"),
    "fully_masked_rows": Case(mask="empty_rows"),
    "causal_key_padding_gqa": Case(batch=2, q_heads=4, kv_heads=1, mask="keys", is_causal=True),
    "large_values": Case(std=3.0, head_dim=64, value_dim=64),
    # Padding rows masked with −1e9 / finfo.min / −1e30 (the usual idioms): the gradients used to
    # be Nk× too large there (the lse lost log l), finfo.min zeroed the row on Triton, and −1e30 over
    # a whole query block skipped the lazy rescale.
    # Their scores sit near −1e4 (the mask floor), where float32's spacing is 2^-10: recomputing P
    # from the lse loses up to half of it (5e-4 relative), which math SDPA, keeping P, does not.
    "padding_rows_1e9": Case(mask="padding_rows_1e9", grad_ratio=3.0),
    "padding_rows_min": Case(mask="padding_rows_min", grad_ratio=3.0),
    "padding_rows_1e30": Case(n_queries=40, mask="padding_rows_1e30", grad_ratio=3.0),
    # Sequence lengths that are multiples of the tile side (the interpreter's 32; on a GPU, the
    # autotuned one): the kernels drop the edge masks there.
    "even": Case(n_queries=64, n_keys=96),
    "even_causal": Case(n_queries=128, n_keys=128, is_causal=True),
    "even_key_padding": Case(n_queries=64, n_keys=64, mask="keys"),
    "even_keys_ragged_queries": Case(n_queries=50, n_keys=64),
    "even_queries_ragged_keys": Case(n_queries=96, n_keys=70),
}


def _math_sdpa(q, k, v, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _jvp_and_grads(attention, primals, tangents, grad_out, **kwargs):
    """(out, out_dot, dq, dk, dv) of `attention` through torch.func.jvp, then backward."""
    primals = tuple(p.detach().requires_grad_() for p in primals)
    out, out_dot = torch.func.jvp(lambda q, k, v: attention(q, k, v, **kwargs), primals, tangents)
    grads = torch.autograd.grad(out, primals, grad_out)
    return (out, out_dot, *grads)


def check_against_math_sdpa(case: Case, dtype: torch.dtype):
    primals, tangents, mask = case.inputs(dtype)
    kwargs = case.kwargs(mask)
    grad_out = _grad_like(primals, case, dtype)
    ours = _jvp_and_grads(jvp_attention, primals, tangents, grad_out, **kwargs)
    oracle = _jvp_and_grads(
        _math_sdpa, tuple(p.double() for p in primals), tuple(t.double() for t in tangents), grad_out.double(),
        **case.sdpa_kwargs(mask, torch.float64),
    )
    baseline = (_jvp_and_grads(_math_sdpa, primals, tangents, grad_out, **case.sdpa_kwargs(mask, dtype))
                if dtype != torch.float64 else None)
    # Gradients that cancel to zero (one visible key) are judged at the size of the scores.
    softmax_scale = case.scale if case.scale is not None else case.head_dim ** -0.5
    magnitude = max(1.0, case.std) ** 2 * max(1.0, softmax_scale * case.head_dim ** 0.5)
    errors = {}
    for i, name in enumerate(("out", "out_dot", "dq", "dk", "dv")):
        assert ours[i].dtype == dtype
        errors[name] = assert_close_to_oracle(name, ours[i], oracle[i], None if baseline is None else baseline[i],
                                              ratio=case.grad_ratio if name[0] == "d" else 2.0, magnitude=magnitude)
    return errors


def _grad_like(primals, case, dtype):
    shape = (case.batch, case.q_heads, case.n_queries, case.value_dim)
    return torch.randn(shape, dtype=torch.float64).to(device=primals[0].device, dtype=dtype)


@pytest.mark.parametrize("case_name", list(CASES))
def test_jvp_attention_matches_math_sdpa(backend, case_name):
    for dtype in backend_dtypes(backend):
        check_against_math_sdpa(CASES[case_name], dtype)


def test_even_flags_follow_the_chosen_tile():
    """EVEN_M / EVEN_N are derived per configuration, after the autotuner's choice: 192 queries are
    even for 64-row tiles only; and the interpreter's tile sends the "even" cases above down the
    unmasked path (the forward has no EVEN_M: its query tile is loaded once)."""
    ja = importlib.import_module("meanflow.kernels.jvp_attention")
    for kernel in (ja._jvp_attention_bwd_dkdv_kernel, ja._jvp_attention_bwd_dq_kernel):
        even = kernel.fn.values
        args = dict(n_queries=192, n_keys=4608, BLOCK_M=64, BLOCK_N=128, VARLEN=False)
        assert even["EVEN_M"](args) and even["EVEN_N"](args)
        assert not even["EVEN_M"](dict(args, BLOCK_M=128))
        # Packed sequences end anywhere: their lengths are only the longest.
        assert not even["EVEN_M"](dict(args, VARLEN=True)) and not even["EVEN_N"](dict(args, VARLEN=True))
    assert set(ja._jvp_attention_fwd_kernel.fn.values) == {"EVEN_N"}
    block_m, block_n = ja.INTERPRETER_TILE[:2]
    for name in ("even", "even_causal", "even_key_padding"):
        assert CASES[name].n_queries % block_m == 0 and CASES[name].n_keys % block_n == 0
    assert CASES["even_keys_ragged_queries"].n_queries % block_m != 0
    assert CASES["even_queries_ragged_keys"].n_keys % block_n != 0


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 8.0])
@pytest.mark.parametrize("case", [Case(n_queries=21, n_keys=130, mask="ramp"), Case(std=3.0, n_keys=97),
                                  Case(n_keys=70, mask="empty_rows"), Case(n_queries=40, n_keys=90, is_causal=True)],
                         ids=["ramp", "large_values", "empty_rows", "causal"])
def test_lazy_rescale_matches_math_sdpa(monkeypatch, poison_empty, threshold, case):
    """The forward kernel's rescale threshold (negative: every key block; 0: whenever a row's max
    grows; 8: only past a growth of 2^8) changes no result. The ramp's 40 units of score over the
    keys make the maxima of even rows grow by far more than 2^8 from block to block, so stale and
    moved maxima both occur; the odd rows peak in the first block."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    monkeypatch.setattr(importlib.import_module("meanflow.kernels.jvp_attention"), "RESCALE_THRESHOLD", threshold)
    for dtype in INTERPRETED_DTYPES:
        check_against_math_sdpa(case, dtype)


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    n_queries=st.integers(1, 80),
    n_keys=st.integers(1, 80),
    head_dim=st.sampled_from([16, 24, 40, 64, 72]),
    value_dim=st.sampled_from([16, 32, 48]),
    is_causal=st.booleans(),
    mask=st.sampled_from(["none", "keys", "bool", "additive", "empty_rows"]),
    scale=st.sampled_from([None, 0.2, 1.5]),
    std=st.sampled_from([0.5, 1.0, 2.5]),
    dtype=st.sampled_from(INTERPRETED_DTYPES),
    backend_name=st.sampled_from(BACKENDS),
)
@example(batch=1, kv_heads=1, group=1, n_queries=33, n_keys=1, head_dim=16, value_dim=16, is_causal=True,
         mask="none", scale=None, std=1.0, dtype=torch.float32, backend_name="triton")
def test_jvp_attention_hypothesis(monkeypatch, batch, kv_heads, group, n_queries, n_keys, head_dim, value_dim,
                                  is_causal, mask, scale, std, dtype, backend_name):
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    case = Case(batch=batch, q_heads=kv_heads * group, kv_heads=kv_heads, n_queries=n_queries, n_keys=n_keys,
                head_dim=head_dim, value_dim=value_dim, is_causal=is_causal, mask=mask, scale=scale, std=std)
    check_against_math_sdpa(case, dtype)


def test_forward_ad_dual_tensors_match_func_jvp(backend):
    case = CASES["gqa_d48"]
    primals, tangents, mask = case.inputs(torch.float32)
    kwargs = case.kwargs(mask)
    out, out_dot = torch.func.jvp(lambda q, k, v: jvp_attention(q, k, v, **kwargs), primals, tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        dual_out = fwAD.unpack_dual(jvp_attention(*duals, **kwargs))
    torch.testing.assert_close(dual_out.primal, out, rtol=0, atol=0)
    torch.testing.assert_close(dual_out.tangent, out_dot, rtol=0, atol=0)


def test_meanflow_pattern_gradients(backend):
    """out, tan = jvp(...); loss(out, tan.detach()).backward(): gradients flow through out only."""
    case = CASES["causal_key_padding_gqa"]
    primals, tangents, mask = case.inputs(torch.float32)

    def grads(attention, dtype):
        ps = tuple(p.detach().to(dtype).clone().requires_grad_() for p in primals)
        ts = tuple(t.to(dtype) for t in tangents)
        kwargs = case.kwargs(mask) if attention is jvp_attention else case.sdpa_kwargs(mask, dtype)
        out, tan = torch.func.jvp(lambda q, k, v: attention(q, k, v, **kwargs), ps, ts)
        if attention is jvp_attention:  # math SDPA's tangent keeps its autograd history
            assert tan.grad_fn is None and not tan.requires_grad
        ((out - tan.detach()) ** 2).sum().backward()
        return [p.grad for p in ps]

    for ours, oracle in zip(grads(jvp_attention, torch.float32), grads(_math_sdpa, torch.float64)):
        assert_close_to_oracle("grad", ours, oracle)


def test_tangent_output_has_no_autograd_history(backend):
    primals, tangents, _ = CASES["square"].inputs(torch.float32)
    primals = tuple(p.requires_grad_() for p in primals)
    out, out_dot = torch.func.jvp(jvp_attention, primals, tangents)
    assert out.grad_fn is not None
    assert out_dot.grad_fn is None and not out_dot.requires_grad


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 2), (1, 2)])
def test_tangent_subsets_pass_only_present_tangents(backend, monkeypatch, which):
    """Inputs without a tangent reach the kernel as None (no work), and the result is right."""
    impl = importlib.import_module(
        "meanflow.kernels.jvp_attention" if backend == "triton" else "meanflow.reference.jvp_attention")
    seen = []
    original = impl.jvp_attention_forward

    def spy(q, k, v, q_dot, k_dot, v_dot, *args):
        seen.append(tuple(t is not None for t in (q_dot, k_dot, v_dot)))
        return original(q, k, v, q_dot, k_dot, v_dot, *args)

    monkeypatch.setattr(impl, "jvp_attention_forward", spy)
    primals, tangents, _ = CASES["ragged_dv"].inputs(torch.float32)

    def attention_of_selected(*selected):
        args = list(primals)
        for i, x in zip(which, selected):
            args[i] = x
        return jvp_attention(*args)

    def sdpa_of_selected(*selected):
        args = [p.double() for p in primals]
        for i, x in zip(which, selected):
            args[i] = x
        return _math_sdpa(*args)

    _, out_dot = torch.func.jvp(attention_of_selected, tuple(primals[i] for i in which),
                                tuple(tangents[i] for i in which))
    _, expected = torch.func.jvp(sdpa_of_selected, tuple(primals[i].double() for i in which),
                                 tuple(tangents[i].double() for i in which))
    assert seen == [tuple(i in which for i in range(3))]
    assert_close_to_oracle("out_dot", out_dot, expected)


def test_zero_tangents_give_zero_tangent(backend):
    primals, _, _ = CASES["square"].inputs(torch.float32)
    _, out_dot = torch.func.jvp(jvp_attention, primals, tuple(torch.zeros_like(p) for p in primals))
    assert torch.equal(out_dot, torch.zeros_like(out_dot))


def test_pair_form_matches_func_jvp(backend):
    case = CASES["mqa_d72"]
    primals, tangents, mask = case.inputs(torch.float32)
    kwargs = case.kwargs(mask)
    expected_out, expected_dot = torch.func.jvp(lambda q, k, v: jvp_attention(q, k, v, **kwargs), primals, tangents)
    q, k, v = (p.clone().requires_grad_() for p in primals)
    out, out_dot = jvp_attention_pair(q, k, v, *tangents, **kwargs)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(out_dot, expected_dot, rtol=0, atol=0)
    assert out.grad_fn is not None and out_dot.grad_fn is None
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v))


def test_pair_form_without_tangents_gives_zeros(backend):
    primals, _, _ = CASES["square"].inputs(torch.float32)
    out, out_dot = jvp_attention_pair(*primals, None, None, None)
    torch.testing.assert_close(out, _math_sdpa(*primals), rtol=1e-5, atol=1e-6)
    assert torch.equal(out_dot, torch.zeros_like(out))


def test_plain_forward_and_backward_match_sdpa(backend):
    primals, _, mask = CASES["key_padding"].inputs(torch.float32)
    ps = [p.clone().requires_grad_() for p in primals]
    ours = jvp_attention(*ps, attn_mask=mask)
    ours.sum().backward()
    ref_ps = [p.double().requires_grad_() for p in primals]
    expected = _math_sdpa(*ref_ps, attn_mask=mask)
    expected.sum().backward()
    assert_close_to_oracle("out", ours, expected)
    for p, r in zip(ps, ref_ps):
        assert_close_to_oracle("grad", p.grad, r.grad)


def test_three_dimensional_inputs(backend):
    q, k, v = (torch.randn(2, n, 32) for n in (19, 27, 27))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    mask = torch.rand(2, 19, 27) > 0.2
    out, out_dot = torch.func.jvp(lambda a, b, c: jvp_attention(a, b, c, attn_mask=mask), (q, k, v), tangents)
    expected = torch.func.jvp(lambda a, b, c: _math_sdpa(a, b, c, attn_mask=mask),
                              tuple(t.double() for t in (q, k, v)), tuple(t.double() for t in tangents))
    assert out.shape == (2, 19, 32)
    assert_close_to_oracle("out", out, expected[0])
    assert_close_to_oracle("out_dot", out_dot, expected[1])


def test_strided_inputs_from_sequence_major_layout(backend):
    """(B, N, H, D) projections transposed to (B, H, N, D), as diffusers does: no copy needed."""
    q, k, v = (torch.randn(1, n, 3, 32).transpose(1, 2) for n in (21, 34, 34))
    tangents = tuple(torch.randn(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2) for t in (q, k, v))
    out, out_dot = torch.func.jvp(jvp_attention, (q, k, v), tangents)
    expected = torch.func.jvp(_math_sdpa, tuple(t.double() for t in (q, k, v)), tuple(t.double() for t in tangents))
    assert_close_to_oracle("out", out, expected[0])
    assert_close_to_oracle("out_dot", out_dot, expected[1])


def test_non_unit_last_stride_is_copied(backend):
    q, k, v = (torch.randn(1, 2, 32, n).transpose(-1, -2) for n in (9, 14, 14))
    assert q.stride(-1) != 1
    expected = _math_sdpa(*(t.double() for t in (q, k, v)))
    assert_close_to_oracle("out", jvp_attention(q, k, v), expected)


def test_empty_key_sequence_gives_zeros_like_sdpa(backend):
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16)
    torch.testing.assert_close(jvp_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_numpy_scale_is_accepted_like_sdpa(backend):
    """A NumPy scalar scale (numbers.Real, not a float subclass) counts as its value, as in SDPA."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    expected = jvp_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(jvp_attention(q, k, v, scale=np.float32(0.25)), expected, rtol=0, atol=0)


def test_autocast_runs_in_the_autocast_dtype(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert jvp_attention(q, k, v).dtype == torch.bfloat16


def test_autocast_leaves_float64_alone_like_sdpa(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.float64) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, expected = jvp_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
        out, out_dot = jvp_attention_pair(q, k, v, torch.ones_like(q), None, None)
    assert ours.dtype == expected.dtype == out.dtype == out_dot.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["(N, D)", "(B, N, D)", "(B, T, H, N, D)", "(B, T, H, N, D) masked"])
def test_every_sdpa_layout_matches_math_sdpa(backend, layout):
    """SDPA takes (..., N, D) with any batch dims or none; so does jvp_attention, primal, tangent
    and gradients, the pair form too (a mask broadcast over some batch dims included)."""
    lead = {"(N, D)": (), "(B, N, D)": (2,)}.get(layout, (2, 3, 2))
    for dtype in backend_dtypes(backend):
        primals = tuple(torch.randn(*lead, n, 16, dtype=torch.float64).to(dtype) for n in (19, 23, 23))
        tangents = tuple(torch.randn_like(t) for t in primals)
        grad_out = torch.randn(*lead, 19, 16, dtype=torch.float64).to(dtype)
        kwargs = {}
        if layout.endswith("masked"):  # per outer batch and query row, shared by the middle dim and heads
            mask = torch.rand(2, 1, 1, 19, 23) > 0.3
            mask[..., 0] = True
            kwargs["attn_mask"] = mask
        ours = _jvp_and_grads(jvp_attention, primals, tangents, grad_out, **kwargs)
        oracle = _jvp_and_grads(_math_sdpa, tuple(p.double() for p in primals), tuple(t.double() for t in tangents),
                                grad_out.double(), **kwargs)
        baseline = _jvp_and_grads(_math_sdpa, primals, tangents, grad_out, **kwargs)
        for name, got, want, base in zip(("out", "out_dot", "dq", "dk", "dv"), ours, oracle, baseline):
            assert got.shape == want.shape and got.dtype == dtype
            assert_close_to_oracle(f"{name} ({dtype})", got, want, base)
        out, out_dot = jvp_attention_pair(*primals, *tangents, **kwargs)
        assert_close_to_oracle("pair out", out, oracle[0], baseline[0])
        assert_close_to_oracle("pair out_dot", out_dot, oracle[1], baseline[1])


def _qkv(**overrides):
    shapes = dict(q=(1, 2, 8, 16), k=(1, 2, 10, 16), v=(1, 2, 10, 16))
    shapes.update(overrides)
    return [torch.randn(*shapes[n]) for n in ("q", "k", "v")]


@pytest.mark.parametrize("call, match", [
    (lambda: jvp_attention(*_qkv(), dropout_p=0.1), "dropout_p"),
    (lambda: jvp_attention(*_qkv(q=(2, 8, 16))), "key must have query's 3 dimensions"),
    (lambda: jvp_attention(*_qkv(q=(16,), k=(16,), v=(16,))), "query must be"),
    (lambda: jvp_attention(*_qkv(k=(1, 2, 10, 8))), "head dim"),
    (lambda: jvp_attention(*_qkv(v=(1, 2, 11, 16))), "value's leading shape"),
    (lambda: jvp_attention(*_qkv(k=(2, 2, 10, 16), v=(2, 2, 10, 16))), "batch shape"),
    (lambda: jvp_attention(*_qkv(q=(2, 3, 2, 8, 16), k=(2, 1, 2, 10, 16), v=(2, 1, 2, 10, 16))), "batch shape"),
    (lambda: jvp_attention(*_qkv(k=(1, 1, 10, 16), v=(1, 1, 10, 16))), "enable_gqa"),
    (lambda: jvp_attention(*_qkv(q=(1, 3, 8, 16)), enable_gqa=True), "multiple of key heads"),
    (lambda: jvp_attention(_qkv()[0], _qkv()[1].half(), _qkv()[2]), "key must have query's dtype"),
    (lambda: jvp_attention(_qkv()[0].int(), *_qkv()[1:]), "query must be one of float16"),
    (lambda: jvp_attention(_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), "key must be on query's device"),
    (lambda: jvp_attention(*_qkv(), attn_mask=torch.ones(3, 10, dtype=torch.bool)), "attn_mask of shape"),
    (lambda: jvp_attention(*_qkv(), attn_mask=torch.ones(8, 10, dtype=torch.int64)), "attn_mask must be bool"),
    (lambda: jvp_attention(*_qkv(), attn_mask=torch.zeros(8, 10, requires_grad=True)), "attn_mask requires grad"),
    (lambda: jvp_attention(*_qkv(), attn_mask=[[True]]), "attn_mask must be a torch.Tensor"),
    (lambda: jvp_attention(*_qkv(), scale=float("nan")), "scale"),
    (lambda: jvp_attention(*_qkv(), is_causal=1), "is_causal"),
    (lambda: jvp_attention(*_qkv(), enable_gqa="yes"), "enable_gqa"),
    (lambda: jvp_attention("q", *_qkv()[1:]), "query must be a torch.Tensor"),
    (lambda: jvp_attention_pair(*_qkv(), torch.randn(1, 2, 8, 15), None, None), "q_dot must have the shape"),
    (lambda: jvp_attention_pair(*_qkv(), None, torch.randn(1, 2, 10, 16).double(), None), "k_dot must have the dtype"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("which", ["query", "value"])
def test_forward_ad_tangent_of_another_dtype_raises(backend, which):
    """As the pair form's check; the kernel would otherwise fail on mixed-dtype products."""
    q, k, v = _qkv()
    tangents = {"query": (q.half(), None, None), "value": (None, None, v.double())}[which]
    match = f"forward-AD tangent of jvp_attention's {which} must have the dtype"
    with pytest.raises(ValueError, match=match):
        torch.func.jvp(jvp_attention, (q, k, v),
                       tuple(torch.zeros_like(p) if t is None else t for t, p in zip(tangents, (q, k, v))))
    with fwAD.dual_level():
        with pytest.raises(ValueError, match=match):
            jvp_attention(*(p if t is None else fwAD.make_dual(p, t) for t, p in zip(tangents, (q, k, v))))


def test_sparse_tensors_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="query must be a dense"):
        jvp_attention(q.to_sparse(), k, v)
    with pytest.raises(ValueError, match="attn_mask must be a dense"):
        jvp_attention(q, k, v, attn_mask=torch.randn(8, 10).to_sparse())
    with pytest.raises(ValueError, match="v_dot must be a dense"):
        jvp_attention_pair(q, k, v, None, None, v.to_sparse())


def test_mask_tangent_raises():
    q, k, v = _qkv()
    mask = torch.zeros(8, 10)
    with fwAD.dual_level():
        with pytest.raises(ValueError, match="attn_mask has a forward-AD tangent"):
            jvp_attention(q, k, v, attn_mask=fwAD.make_dual(mask, torch.ones_like(mask)))


def test_head_spans_beyond_32_bits_are_refused():
    """The kernels index within a head in 32 bits: a layout whose rows of one head span more is
    refused by name (checked on meta tensors, which need no memory)."""
    from meanflow.kernels.jvp_attention import check_head_spans

    wide = torch.empty_strided((1, 1, 3, 8), (0, 0, 2**30, 1), device="meta")  # rows 2^30 apart
    with pytest.raises(ValueError, match="key: the rows of one batch element and head span 2,147,483,655"):
        check_head_spans(query=wide[..., :2, :], key=wide)
    check_head_spans(query=wide[..., :2, :], attn_mask=None)


def test_gradient_spans_beyond_32_bits_are_refused():
    """Keys broadcast along their rows (stride 0) span nothing, but their gradients, written
    densely, would span 2^25 rows × 64: the backward launcher refuses before allocating them
    (meta tensors: no memory, no launch)."""
    from meanflow.kernels.jvp_attention import jvp_attention_backward

    n_keys = 2**25 + 1
    q, grad_out, out = (torch.empty(1, 1, 4, 64, device="meta") for _ in range(3))
    k = torch.empty(1, 1, 1, 64, device="meta").expand(1, 1, n_keys, 64)
    lse = torch.empty(1, 1, 4, device="meta")
    with pytest.raises(ValueError, match="key_gradient: the rows of one batch element and head would span"):
        jvp_attention_backward(grad_out, q, k, k, out, lse)


def test_backend_errors(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="MEANFLOW_BACKEND must be one of"):
        jvp_attention(*_qkv())
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    with pytest.raises(ValueError, match="not supported by the Triton backend"):
        jvp_attention(*(t.double() for t in _qkv()))
    with pytest.raises(ValueError, match="head dims up to 256"):
        jvp_attention(*_qkv(q=(1, 1, 4, 264), k=(1, 1, 4, 264), v=(1, 1, 4, 264)))


# --------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at FLUX shapes against the float64 reference
# --------------------------------------------------------------------------------------------

GPU_CASES = {
    "flux_4608": Case(q_heads=24, kv_heads=24, n_queries=4608, n_keys=4608, head_dim=128, value_dim=128),
    "flux_1024_causal_keys": Case(batch=2, q_heads=24, kv_heads=24, n_queries=1024, n_keys=1024,
                                  head_dim=128, value_dim=128, is_causal=True, mask="keys"),
    "ragged_d72_gqa": Case(q_heads=8, kv_heads=2, n_queries=777, n_keys=1031, head_dim=72, value_dim=72,
                           mask="additive"),
    "d256": Case(q_heads=4, kv_heads=4, n_queries=300, n_keys=513, head_dim=256, value_dim=256),
    "d96_empty_rows": Case(q_heads=4, kv_heads=4, n_queries=129, n_keys=200, head_dim=96, value_dim=96,
                           mask="empty_rows"),
    "d128_padding_rows_min": Case(q_heads=4, kv_heads=4, n_queries=1000, n_keys=1100, head_dim=128,
                                  value_dim=128, mask="padding_rows_min", grad_ratio=3.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case_name", list(GPU_CASES))
def test_gpu_jvp_attention_against_float64(monkeypatch, case_name, dtype):
    """Prints the error of ours and of math SDPA in the same dtype, both against float64."""
    check_gpu_case(monkeypatch, case_name, GPU_CASES[case_name], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("threshold", [-1.0, 8.0])
@pytest.mark.parametrize("case_name", ["flux_4608", "ramp_1024"])
def test_gpu_rescale_forms_against_float64(monkeypatch, case_name, threshold, dtype):
    """The eager form (threshold < 0) and the lazy one, pinned, at FLUX's shape and with scores
    that climb along the keys (rescales well into the sequence)."""
    monkeypatch.setattr(importlib.import_module("meanflow.kernels.jvp_attention"), "RESCALE_THRESHOLD", threshold)
    case = GPU_CASES.get(case_name) or Case(q_heads=4, kv_heads=4, n_queries=1024, n_keys=1024, head_dim=128,
                                            value_dim=128, mask="ramp")
    check_gpu_case(monkeypatch, f"{case_name} threshold {threshold}", case, dtype)


def check_gpu_case(monkeypatch, case_name: str, case: Case, dtype: torch.dtype) -> None:
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    primals, tangents, mask = case.inputs(dtype, "cuda")
    kwargs = case.kwargs(mask)
    grad_out = torch.randn(case.batch, case.q_heads, case.n_queries, case.value_dim, device="cuda", dtype=dtype)
    ours = _jvp_and_grads(jvp_attention, primals, tangents, grad_out, **kwargs)
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    mask64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    oracle = _jvp_and_grads(jvp_attention, tuple(p.double() for p in primals), tuple(t.double() for t in tangents),
                            grad_out.double(), **case.kwargs(mask64))
    # PyTorch's own computation in `dtype`: math SDPA under torch.func.jvp.
    baseline = _jvp_and_grads(_math_sdpa, primals, tangents, grad_out, **case.sdpa_kwargs(mask, dtype))
    assert_gpu_errors(case_name, dtype, ("out", "out_dot", "dq", "dk", "dv"), ours, oracle, baseline)


def test_nested_jvp_raises(backend):
    q, k, v, q_dot = (torch.randn(1, 1, 4, 16) for _ in range(4))

    def inner_tangent(q):
        return torch.func.jvp(lambda q: jvp_attention(q, k, v), (q,), (q_dot,))[1]

    with pytest.raises(ValueError, match="higher-order forward AD"):
        torch.func.jvp(inner_tangent, (q,), (q_dot,))


def test_double_backward_is_refused(backend):
    """Neither backward records a graph: backward with create_graph=True (a gradient penalty) must
    raise rather than return a gradient without attention's part of the second derivative."""
    q, k, v = (torch.randn(1, 2, 5, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    loss = jvp_attention(q, k, v).square().sum()
    with pytest.raises(ValueError, match="double backward"):
        torch.autograd.grad(loss, (q, k, v), create_graph=True)
    loss.backward()  # an ordinary backward of the same graph still works
    assert q.grad is not None


def test_func_grad(backend):
    """torch.func.grad works on both backends (the Triton one's backward runs the reference on
    torch.func's wrapped tensors)."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))

    def loss(q):
        return jvp_attention(q, k, v).square().sum()

    q64 = q.double().requires_grad_()
    _math_sdpa(q64, k.double(), v.double()).square().sum().backward()
    assert_close_to_oracle("dq", torch.func.grad(loss)(q), q64.grad)


def test_zero_heads_give_empty_outputs_and_gradients_as_sdpa():
    q = torch.randn(1, 0, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 0, 7, 8, dtype=torch.float64, requires_grad=True)
    out, out_dot = jvp_attention_pair(q, k, k, q.detach(), k.detach(), k.detach())
    assert out.shape == out_dot.shape == torch.nn.functional.scaled_dot_product_attention(q, k, k).shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# --------------------------------------------------------------------------------------------
# JVPAttentionMode: a model that calls SDPA itself, under torch.func.jvp and then backward
# --------------------------------------------------------------------------------------------

class _SelfAttention(torch.nn.Module):
    """A block that calls SDPA itself, positional and keyword arguments mixed, as models do."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, mask, scale=0.3)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def test_mode_runs_a_model_that_calls_sdpa_under_func_jvp(backend):
    """Inside JVPAttentionMode the block's SDPA call is jvp_attention: torch.func.jvp works (CPU
    SDPA raises there without it), and the primal, its tangent and the parameters' gradients
    match the same block over float64 math SDPA."""
    from meanflow.ops import JVPAttentionMode

    block = _SelfAttention()
    x, x_dot = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    mask = torch.rand(2, 1, 19, 19) > 0.3
    mask[..., 0] = True

    def run(model, dtype):
        model.zero_grad()
        out, out_dot = torch.func.jvp(lambda x: model(x, mask), (x.to(dtype),), (x_dot.to(dtype),))
        (out * out_dot.detach()).sum().backward()
        return out, out_dot, *(p.grad for p in model.parameters())

    with JVPAttentionMode():
        ours = run(block, torch.float32)
    with sdpa_kernel(SDPBackend.MATH):
        oracle = run(copy.deepcopy(block).double(), torch.float64)
    for got, want in zip(ours, oracle, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_mode_routes_only_sdpa_and_only_inside(monkeypatch):
    from meanflow.ops import JVPAttentionMode

    module = importlib.import_module("meanflow.ops.jvp_attention")
    calls = []
    real = module.jvp_attention
    monkeypatch.setattr(module, "jvp_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    with JVPAttentionMode():
        torch.testing.assert_close(F.softmax(q, -1), torch.exp(q) / torch.exp(q).sum(-1, keepdim=True))
        inside = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    outside = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert calls == [{"is_causal": True}]
    torch.testing.assert_close(inside, outside)


def test_mode_refuses_attention_dropout():
    from meanflow.ops import JVPAttentionMode

    q = torch.randn(1, 2, 5, 8)
    with JVPAttentionMode(), pytest.raises(ValueError, match="dropout_p"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
