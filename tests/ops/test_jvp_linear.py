"""jvp_linear against torch.func.jvp / autograd of F.linear in float64, both backends.

The Triton backend of jvp_linear is cuBLAS GEMMs through torch (two by default, one stacked
GEMM with MEANFLOW_LINEAR_STACKED=1), so it runs on the CPU without the interpreter, in every
dtype; ``triton_stacked`` below is the triton backend with the stacked GEMM.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from meanflow.ops import jvp_linear, jvp_linear_pair
from meanflow.testing import assert_close_to_oracle
from meanflow.testing import check_pair_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# name: (x shape, Dout, bias, which tangents: x, weight, bias)
CASES = {
    "3d_bias_x": ((2, 7, 37), 29, True, "x"),
    "3d_all_tangents": ((2, 7, 37), 29, True, "xwb"),
    "1d_input": ((37,), 13, True, "xw"),
    "4d_no_bias": ((3, 5, 4, 16), 24, False, "x"),
    "weight_tangent_only": ((5, 19), 11, True, "w"),
    "bias_tangent_only": ((5, 19), 11, True, "b"),
    "no_tangent": ((5, 19), 11, True, ""),
    "single": ((1, 1, 8), 1, True, "xwb"),
    # Empty sizes, as F.linear takes them (the backward's reshape(-1, 0) used to raise).
    "no_input_features": ((3, 0), 5, True, "xwb"),
    "no_output_features": ((2, 3, 4), 0, True, "xwb"),
    "no_rows": ((0, 4), 5, True, "xwb"),
}


@pytest.fixture(params=BACKENDS + ["triton_stacked"])
def backend(request, monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", request.param.removesuffix("_stacked"))
    monkeypatch.setenv("MEANFLOW_LINEAR_STACKED", "1" if request.param.endswith("_stacked") else "0")
    if request.param != "reference":
        request.getfixturevalue("poison_empty")
    return request.param


def _randn(*shape, dtype, std=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * std).to(device=DEVICE, dtype=dtype)


def _pair(primals, tangents):
    x, w, b = primals
    xd, wd, bd = tangents
    return jvp_linear_pair(x, xd, w, b, weight_dot=wd, bias_dot=bd)


def check_linear(x_shape, d_out, bias, which, dtype):
    d_in = x_shape[-1]
    x = _randn(*x_shape, dtype=dtype)
    w = _randn(d_out, d_in, dtype=dtype, std=max(d_in, 1) ** -0.5)
    b = _randn(d_out, dtype=dtype) if bias else None
    tangents = (_randn(*x_shape, dtype=dtype) if "x" in which else None,
                _randn(d_out, d_in, dtype=dtype, std=max(d_in, 1) ** -0.5) if "w" in which else None,
                _randn(d_out, dtype=dtype) if "b" in which and bias else None)
    grad = _randn(*x_shape[:-1], d_out, dtype=dtype)
    return check_pair_op(F.linear, jvp_linear, _pair, (x, w, b), tangents, (True, True, bias), grad,
                         magnitude=max(1.0, x.shape[0] ** 0.5 if x.dim() > 1 else 1.0) * 2)


@pytest.mark.parametrize("case", list(CASES))
def test_jvp_linear_matches_f_linear(backend, case):
    for dtype in ALL_DTYPES:
        check_linear(*CASES[case], dtype)


@given(lead=st.lists(st.integers(1, 9), min_size=0, max_size=3), d_in=st.integers(1, 70),
       d_out=st.integers(1, 70), bias=st.booleans(), which=st.sampled_from(["x", "xw", "xwb", "b"]),
       dtype=st.sampled_from([torch.float32, torch.float16]), backend_name=st.sampled_from(BACKENDS))
def test_jvp_linear_hypothesis(monkeypatch, lead, d_in, d_out, bias, which, dtype, backend_name):
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    check_linear((*lead, d_in), d_out, bias, which, dtype)


def test_forward_ad_through_parameters_of_a_module(backend):
    """torch.func.jvp over functional_call: the weight and bias carry the tangents."""
    lin = torch.nn.Linear(12, 7).to(DEVICE).double()
    x = torch.randn(3, 12, dtype=torch.float64, device=DEVICE)
    params = dict(lin.named_parameters())
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def ours(p):
        return jvp_linear(x, p["weight"], p["bias"])

    def plain(p):
        return torch.func.functional_call(lin, p, (x,))

    y, y_dot = torch.func.jvp(ours, (params,), (tangents,))
    y_ref, y_dot_ref = torch.func.jvp(plain, (params,), (tangents,))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(y_dot, y_dot_ref)


def test_tangent_is_detached_and_y_keeps_its_graph(backend):
    x = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    y, y_dot = jvp_linear_pair(x, torch.randn(4, 8, device=DEVICE), w)
    assert y.grad_fn is not None and y_dot.grad_fn is None and not y_dot.requires_grad
    y.add_(1.0)  # the outputs are not views of one buffer: in-place use is allowed
    y_dot.mul_(2.0)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_no_tangent_gives_zeros(backend):
    x, w = torch.randn(3, 4, device=DEVICE), torch.randn(2, 4, device=DEVICE)
    y, y_dot = jvp_linear_pair(x, None, w)
    assert torch.equal(y_dot, torch.zeros_like(y))


def test_gradcheck_float64(backend):
    x = torch.randn(2, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    xd = torch.randn_like(x)
    assert torch.autograd.gradcheck(lambda x, w, b: jvp_linear_pair(x, xd, w, b)[0], (x, w, b))


def test_under_autocast_casts_like_f_linear():
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, expected = jvp_linear(x, w, b), F.linear(x, w, b)
    assert ours.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(ours, expected)


def test_under_autocast_float64_stays_float64_like_f_linear(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    x, w, b = (t.double() for t in (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, expected = jvp_linear(x, w, b), F.linear(x, w, b)
        y, y_dot = jvp_linear_pair(x, torch.ones_like(x), w, b)
    assert ours.dtype == expected.dtype == y.dtype == y_dot.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-14, atol=1e-14)


def test_tangent_that_requires_grad_gives_a_detached_tangent(backend):
    """Only x_dot requires grad (no autograd node is needed for y): y_dot is still detached."""
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    x_dot = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    y, y_dot = jvp_linear_pair(x, x_dot, w)
    assert y_dot.grad_fn is None and not y_dot.requires_grad
    torch.testing.assert_close(y_dot, F.linear(x_dot.detach(), w))


def test_forward_ad_tangent_of_another_dtype_raises():
    """As the pair form's check (F.linear itself fails inside its matmul)."""
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="forward-AD tangent of jvp_linear's x must have the dtype"):
        torch.func.jvp(lambda x: jvp_linear(x, w), (x,), (x.double(),))
    with fwAD.dual_level():
        with pytest.raises(ValueError, match="forward-AD tangent of jvp_linear's weight must have the dtype"):
            jvp_linear(x, fwAD.make_dual(w, w.half()))


@pytest.mark.parametrize("args, match", [
    (lambda: ([1.0], torch.randn(2, 3)), "x must be a torch.Tensor"),
    (lambda: (torch.randn(4, 3), torch.randn(2, 4)), "weight's Din"),
    (lambda: (torch.randn(4, 3), torch.randn(2, 3, 1)), "weight must be"),
    (lambda: (torch.randn(4, 3), torch.randn(2, 3).double()), "weight must have x's dtype"),
    (lambda: (torch.randn(4, 3), torch.randn(2, 3), torch.randn(3)), "bias must be"),
    (lambda: (torch.randn(4, 3), torch.randn(2, 3), torch.randn(2).half()), "bias must have x's dtype"),
    (lambda: (torch.randint(0, 3, (4, 3)), torch.randn(2, 3)), "x must be one of"),
    (lambda: (torch.randn(4, 3), torch.randn(2, 3, device="meta")), "weight must be on"),
    (lambda: (torch.randn(4, 3).to_sparse(), torch.randn(2, 3)), "x must be a dense"),
    (lambda: (torch.randn(4, 3), torch.randn(2, 3).to_sparse()), "weight must be a dense"),
    (lambda: (torch.randn(4, 3), torch.randn(2, 3), torch.randn(2).to_sparse()), "bias must be a dense"),
])
def test_invalid_arguments_raise(args, match):
    with pytest.raises(ValueError, match=match):
        jvp_linear(*args())


def test_invalid_pair_tangents_raise():
    x, w, b = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2)
    with pytest.raises(ValueError, match="x_dot must have the shape"):
        jvp_linear_pair(x, torch.randn(4, 2), w, b)
    with pytest.raises(ValueError, match="weight_dot must have the dtype"):
        jvp_linear_pair(x, None, w, b, weight_dot=w.double())
    with pytest.raises(ValueError, match="bias_dot was given without a bias"):
        jvp_linear_pair(x, None, w, None, bias_dot=b)


@pytest.mark.gpu
@pytest.mark.parametrize("d_out", [3072, 12288])
def test_flux_shapes_bf16(monkeypatch, d_out):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    x, xd = (torch.randn(1, 4608, 3072, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = (torch.randn(d_out, 3072, device="cuda") * 3072 ** -0.5).bfloat16()
    b = torch.randn(d_out, device="cuda").bfloat16()
    y, y_dot = jvp_linear_pair(x, xd, w, b)
    y64, y_dot64 = torch.func.jvp(F.linear, (x.double(), w.double(), b.double()),
                                  (xd.double(), torch.zeros_like(w, dtype=torch.float64),
                                   torch.zeros_like(b, dtype=torch.float64)))
    base, base_dot = F.linear(x, w, b), F.linear(xd, w)
    for name, ours, oracle, baseline in (("y", y, y64, base), ("y_dot", y_dot, y_dot64, base_dot)):
        err = assert_close_to_oracle(name, ours, oracle, baseline)
        ratio = err / max((baseline.double() - oracle).norm().item() / oracle.norm().item(), 1e-30)
        print(f"jvp_linear {d_out} {name}: rel err {err:.3e}, ratio to torch bf16 {ratio:.2f}")
