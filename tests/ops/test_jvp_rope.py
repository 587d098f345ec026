"""jvp_rope against torch.func.jvp / autograd of FLUX's rotary formula in float64 and against
diffusers' apply_rotary_emb itself, both backends (Triton through the interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given
from hypothesis import strategies as st

from meanflow.ops import jvp_rope, jvp_rope_pair
from meanflow.testing import assert_close_to_oracle, backend_dtypes
from meanflow.testing import check_pair_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
INTERPRETED_DTYPES = [torch.float32, torch.float16]


def rope_formula(x, cos, sin):
    """The rotation in x's dtype without diffusers' float32 cast (so float64 stays float64)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack((-odd, even), dim=-1).flatten(-2) * sin


def diffusers_arithmetic(x, cos, sin):
    """apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1), inlined."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-odd, even), dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def flux_tables(n, d, theta=10000.0):
    """cos, sin (N, D) float32 laid out as diffusers' FluxPosEmbed returns them (pairs repeated)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None] * torch.rand(1, dtype=torch.float64) * 7
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = (pos * freqs).repeat_interleave(2, dim=-1)
    return angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)


def check_rope(shape, dtype, transposed=False, generic_tables=False, with_tangent=True):
    b, h, n, d = shape
    if transposed:  # FLUX's layout: (B, N, H, D) memory seen as (B, H, N, D)
        x = torch.randn(b, n, h, d, dtype=torch.float64).to(device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(b, h, n, d, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    if generic_tables:  # independent entries for the even and odd positions
        cos, sin = (torch.randn(n, d, device=DEVICE) for _ in range(2))
    else:
        cos, sin = flux_tables(n, d)
    x_dot = torch.randn_like(x) if with_tangent else None
    grad = torch.randn(b, h, n, d, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    return check_pair_op(rope_formula, jvp_rope, lambda p, t: jvp_rope_pair(p[0], t[0], p[1], p[2]),
                         (x, cos, sin), (x_dot, None, None), (True, False, False), grad)


CASES = {
    "flux_like_d128": dict(shape=(1, 2, 19, 128), transposed=True),
    "ragged_d24": dict(shape=(2, 3, 33, 24)),
    "d2_single_token": dict(shape=(1, 1, 1, 2)),
    "d40_generic_tables": dict(shape=(1, 2, 17, 40), generic_tables=True),
    "d6_no_tangent": dict(shape=(2, 1, 5, 6), with_tangent=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rope_matches_formula(backend, case):
    for dtype in backend_dtypes(backend):
        check_rope(dtype=dtype, **CASES[case])


def test_outputs_are_contiguous_from_a_transposed_view(backend):
    """y and ẏ come out contiguous (B, H, N, D) on both backends, from FLUX's transposed view too."""
    for dtype in backend_dtypes(backend):
        x, x_dot = (torch.randn(2, 7, 3, 8, device=DEVICE).to(dtype).transpose(1, 2) for _ in range(2))
        cos, sin = flux_tables(7, 8)
        for t in (jvp_rope(x, cos, sin), *jvp_rope_pair(x, x_dot, cos, sin)):
            assert t.is_contiguous(), (dtype, t.stride())


def test_reference_equals_diffusers_exactly(monkeypatch):
    apply_rotary_emb = pytest.importorskip("diffusers.models.embeddings").apply_rotary_emb
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    cos, sin = flux_tables(21, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 21, 3, 64, device=DEVICE).to(dtype).transpose(1, 2)
        assert torch.equal(jvp_rope(x, cos, sin), apply_rotary_emb(x, (cos, sin), use_real=True,
                                                                   use_real_unbind_dim=-1))


def test_triton_matches_diffusers(monkeypatch):
    apply_rotary_emb = pytest.importorskip("diffusers.models.embeddings").apply_rotary_emb
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    cos, sin = flux_tables(21, 64)
    for dtype in INTERPRETED_DTYPES:
        x = torch.randn(2, 21, 3, 64, device=DEVICE).to(dtype).transpose(1, 2)
        expected = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)
        # One rounding of the same float32 arithmetic (an FMA on a GPU may move it by an ulp).
        torch.testing.assert_close(jvp_rope(x, cos, sin), expected, rtol=0, atol=0 if DEVICE == "cpu" else 2e-3)


@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 40), half=st.integers(1, 40),
       transposed=st.booleans(), dtype=st.sampled_from(INTERPRETED_DTYPES), backend_name=st.sampled_from(BACKENDS))
def test_rope_hypothesis(monkeypatch, b, h, n, half, transposed, dtype, backend_name):
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    check_rope((b, h, n, 2 * half), dtype, transposed=transposed, generic_tables=True)


def test_float64_tables_on_triton(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    cos, sin = flux_tables(9, 16)
    x = torch.randn(1, 2, 9, 16, device=DEVICE)
    torch.testing.assert_close(jvp_rope(x, cos.double(), sin.double()), rope_formula(x, cos, sin))


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    cos, sin = (torch.randn(5, 6, dtype=torch.float64) for _ in range(2))
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: jvp_rope_pair(x, torch.ones_like(x), cos, sin)[0], (x,))


def test_double_backward(backend):
    """A gradient penalty (through x², so the second derivative is not zero): backward with
    create_graph=True must give a gradient that carries its graph (the Triton kernel's gradient
    carries none, so that backward runs in plain torch)."""
    cos, sin = flux_tables(5, 8)
    x = torch.randn(1, 2, 5, 8, device=DEVICE)
    c = torch.randn_like(x)
    penalties = []
    for fn in (lambda x: jvp_rope(x * x, cos, sin), lambda x: rope_formula(x * x, cos, sin)):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(leaf) * c).sum(), leaf, create_graph=True)
        assert g.requires_grad
        penalties.append(torch.autograd.grad(g.square().sum(), leaf)[0])
    torch.testing.assert_close(*penalties, rtol=1e-4, atol=1e-5)


def test_invalid_arguments_raise():
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    x = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="x must be"):
        jvp_rope(x[0], cos, sin)
    with pytest.raises(ValueError, match="head dim must be even"):
        jvp_rope(torch.randn(1, 2, 5, 7), torch.randn(5, 7), torch.randn(5, 7))
    with pytest.raises(ValueError, match="cos must be"):
        jvp_rope(x, cos[:4], sin)
    with pytest.raises(ValueError, match="sin must be one of"):
        jvp_rope(x, cos, sin.long())
    with pytest.raises(ValueError, match="cos requires grad"):
        jvp_rope(x, cos.requires_grad_(), sin)
    with pytest.raises(ValueError, match="sin must be on"):
        jvp_rope(x, torch.randn(5, 8), sin.to("meta"))
    with pytest.raises(ValueError, match="x_dot must have the shape"):
        jvp_rope_pair(x, x[:, :1], torch.randn(5, 8), sin)
    with fwAD.dual_level():
        dual_sin = fwAD.make_dual(sin, torch.randn_like(sin))
        with pytest.raises(ValueError, match="sin has a forward-AD tangent"):
            jvp_rope(x, torch.randn(5, 8), dual_sin)


@pytest.mark.gpu
def test_flux_shape_bf16(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    x, xd = (torch.randn(1, 4608, 24, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    cos, sin = flux_tables(4608, 128)
    y, y_dot = jvp_rope_pair(x, xd, cos, sin)
    y64, y_dot64 = rope_formula(x.double(), cos.double(), sin.double()), rope_formula(xd.double(), cos.double(),
                                                                                      sin.double())
    base, base_dot = (diffusers_arithmetic(t, cos, sin) for t in (x, xd))  # no diffusers on GPU machines
    for name, ours, oracle, baseline in (("y", y, y64, base), ("y_dot", y_dot, y_dot64, base_dot)):
        err = assert_close_to_oracle(name, ours, oracle, baseline)
        ratio = err / max((baseline.double() - oracle).norm().item() / oracle.norm().item(), 1e-30)
        print(f"jvp_rope {name}: rel err {err:.3e}, ratio to diffusers bf16 {ratio:.2f}")
