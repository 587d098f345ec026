"""jvp_gated_residual against torch.func.jvp / autograd of ``h + gate.unsqueeze(1) * y`` in
float64, both backends (Triton through the interpreter on CPU: fp32, fp16)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from meanflow.ops import jvp_gated_residual, jvp_gated_residual_pair
from meanflow.testing import assert_close_to_oracle, backend_dtypes
from meanflow.testing import check_pair_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
INTERPRETED_DTYPES = [torch.float32, torch.float16]


def formula(h, gate, y):
    return h + (gate.unsqueeze(1) if gate.dim() == 2 else gate) * y


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def check_gated(shape, dtype, which="hgy", gate_3d=False, strided=False):
    b, n, d = shape
    h, y = _randn(b, n, d, dtype=dtype), _randn(b, n, d, dtype=dtype)
    if strided:  # the gate as a chunk of AdaLN's (B, 6D) output, h a token slice
        gate = _randn(b, 6 * d, dtype=dtype)[:, 2 * d:3 * d]
        h = _randn(b, n + 3, d, dtype=dtype)[:, 3:]
    else:
        gate = _randn(b, 1, d, dtype=dtype) if gate_3d else _randn(b, d, dtype=dtype)
    tangents = tuple(torch.randn_like(t) if k in which else None for t, k in zip((h, gate, y), "hgy"))
    grad = _randn(b, n, d, dtype=dtype)
    return check_pair_op(
        formula, jvp_gated_residual,
        lambda p, t: jvp_gated_residual_pair(p[0], t[0], p[1], t[1], p[2], t[2]),
        (h, gate, y), tangents, (True, True, True), grad, magnitude=2.0)


CASES = {
    "all_tangents": dict(shape=(2, 37, 40)),
    "chunks_and_ragged_d": dict(shape=(1, 150, 300)),  # > CHUNK_N tokens, > BLOCK_D channels
    "gate_b1d": dict(shape=(2, 9, 24), gate_3d=True),
    "strided_inputs": dict(shape=(2, 11, 32), strided=True),
    "h_tangent_only": dict(shape=(1, 5, 8), which="h"),
    "gate_tangent_only": dict(shape=(2, 5, 8), which="g"),
    "y_tangent_only": dict(shape=(2, 5, 8), which="y"),
    "no_tangent": dict(shape=(2, 5, 8), which=""),
    "single": dict(shape=(1, 1, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gated_residual_matches_formula(backend, case):
    for dtype in backend_dtypes(backend):
        check_gated(dtype=dtype, **CASES[case])


@given(b=st.integers(1, 3), n=st.integers(1, 140), d=st.integers(1, 300), which=st.sampled_from(["hgy", "gy", "h"]),
       gate_3d=st.booleans(), dtype=st.sampled_from(INTERPRETED_DTYPES), backend_name=st.sampled_from(BACKENDS))
def test_gated_residual_hypothesis(monkeypatch, b, n, d, which, gate_3d, dtype, backend_name):
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    check_gated((b, n, d), dtype, which=which, gate_3d=gate_3d)


def test_outputs_are_contiguous_from_transposed_inputs(backend):
    """out and ȯut come out contiguous (B, N, D) on both backends, whatever h's and y's strides."""
    for dtype in backend_dtypes(backend):
        h, h_dot, y, y_dot = (_randn(5, 2, 16, dtype=dtype).transpose(0, 1) for _ in range(4))
        gate, gate_dot = _randn(2, 16, dtype=dtype), _randn(2, 16, dtype=dtype)
        pair = jvp_gated_residual_pair(h, h_dot, gate, gate_dot, y, y_dot)
        for t in (jvp_gated_residual(h, gate, y), *pair):
            assert t.is_contiguous(), (dtype, t.stride())


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    h, y = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    g = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, g, y: jvp_gated_residual_pair(h, torch.ones_like(h), g, None, y, None)[0], (h, g, y))


def test_only_some_inputs_need_grad(backend):
    h = torch.randn(2, 5, 8, device=DEVICE)
    g = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    y = torch.randn(2, 5, 8, device=DEVICE)
    out, _ = jvp_gated_residual_pair(h, None, g, None, y, torch.randn_like(y))
    (dg,) = torch.autograd.grad(out, g, torch.ones_like(out))
    torch.testing.assert_close(dg, y.sum(1), rtol=1e-5, atol=1e-5)


def test_double_backward(backend):
    """A gradient penalty (x as h, gate and y, so the second derivative is not zero): backward with
    create_graph=True must give a gradient that carries its graph (the Triton kernel's gradients
    carry none, so that backward runs in plain torch)."""
    x = torch.randn(2, 3, 5, device=DEVICE)
    c = torch.randn_like(x)
    penalties = []
    for fn in (lambda x: jvp_gated_residual(x, x[:, 0], x), lambda x: formula(x, x[:, 0], x)):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(leaf) * c).sum(), leaf, create_graph=True)
        assert g.requires_grad
        penalties.append(torch.autograd.grad(g.square().sum(), leaf)[0])
    torch.testing.assert_close(*penalties, rtol=1e-4, atol=1e-5)


def test_invalid_arguments_raise():
    h, g, y = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="h must be"):
        jvp_gated_residual(h[0], g, y[0])
    with pytest.raises(ValueError, match="y must have h's shape"):
        jvp_gated_residual(h, g, y[:, :4])
    with pytest.raises(ValueError, match="gate must be"):
        jvp_gated_residual(h, g[:, :7], y)
    with pytest.raises(ValueError, match="gate must have h's dtype"):
        jvp_gated_residual(h, g.double(), y)
    with pytest.raises(ValueError, match="y must be on"):
        jvp_gated_residual(h, g, y.to("meta"))
    with pytest.raises(ValueError, match="gate must be one of"):
        jvp_gated_residual(h, g.int(), y)
    with pytest.raises(ValueError, match="gate_dot must have the shape"):
        jvp_gated_residual_pair(h, None, g, g[:1], y, None)


@pytest.mark.gpu
def test_flux_shape_bf16(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    h, y, hd, yd = (torch.randn(1, 4608, 3072, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    g, gd = (torch.randn(1, 3072, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, out_dot = jvp_gated_residual_pair(h, hd, g, gd, y, yd)
    o64, o_dot64 = torch.func.jvp(formula, (h.double(), g.double(), y.double()), (hd.double(), gd.double(),
                                                                                  yd.double()))
    base, base_dot = torch.func.jvp(formula, (h, g, y), (hd, gd, yd))
    for name, ours, oracle, baseline in (("out", out, o64, base), ("out_dot", out_dot, o_dot64, base_dot)):
        err = assert_close_to_oracle(name, ours, oracle, baseline)
        ratio = err / max((baseline.double() - oracle).norm().item() / oracle.norm().item(), 1e-30)
        print(f"jvp_gated_residual {name}: rel err {err:.3e}, ratio to torch bf16 {ratio:.2f}")
