"""jvp_gelu_tanh / jvp_silu against torch.func.jvp and autograd of F.gelu(tanh) / F.silu in
float64, both backends (Triton through the interpreter on CPU: fp32, fp16)."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from meanflow.ops import (JVP_GELU_TANH, JVP_SILU, apply_pair, jvp_gelu_tanh, jvp_gelu_tanh_pair, jvp_silu,
                          jvp_silu_pair)
from meanflow.testing import assert_close_to_oracle, backend_dtypes
from meanflow.testing import check_pair_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
INTERPRETED_DTYPES = [torch.float32, torch.float16]

KINDS = {
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), jvp_gelu_tanh, jvp_gelu_tanh_pair),
    "silu": (F.silu, jvp_silu, jvp_silu_pair),
}
PAIR_OPS = {"gelu_tanh": JVP_GELU_TANH, "silu": JVP_SILU}
SHAPES = {"ragged_1d": (37,), "over_one_block": (5, 1001), "3d": (2, 3, 7), "single": (1,)}


def check_activation(kind, shape, dtype, std=1.0, with_tangent=True, transpose=False):
    formula, functional, pair = KINDS[kind]
    x = (torch.randn(*shape, dtype=torch.float64) * std).to(device=DEVICE, dtype=dtype)
    if transpose and x.dim() >= 2:
        x = x.transpose(0, -1)
    x_dot = torch.randn_like(x) if with_tangent else None
    grad = torch.randn_like(x)
    return check_pair_op(formula, functional, lambda p, t: pair(p[0], t[0]), (x,), (x_dot,), (True,), grad,
                         magnitude=max(1.0, std))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activation_matches_torch(backend, kind, shape):
    for dtype in backend_dtypes(backend):
        check_activation(kind, SHAPES[shape], dtype)


@pytest.mark.parametrize("kind", list(KINDS))
def test_saturated_tails_and_non_contiguous_input(backend, kind):
    for dtype in backend_dtypes(backend):
        check_activation(kind, (3, 40), dtype, std=12.0, transpose=True)
        check_activation(kind, (50,), dtype, with_tangent=False)


@pytest.mark.parametrize("kind", list(KINDS))
def test_extreme_values_are_finite(backend, kind):
    _, functional, pair = KINDS[kind]
    x = torch.tensor([-1e4, -100.0, -30.0, -1e-6, 0.0, 1e-6, 30.0, 100.0, 1e4], device=DEVICE)
    y, y_dot = pair(x, torch.ones_like(x))
    y64, y_dot64 = torch.func.jvp(KINDS[kind][0], (x.double(),), (torch.ones_like(x, dtype=torch.float64),))
    assert torch.isfinite(y).all() and torch.isfinite(y_dot).all()
    torch.testing.assert_close(y, y64.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_dot, y_dot64.float(), rtol=1e-6, atol=1e-6)


@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3), std=st.sampled_from([0.3, 1.0, 5.0]),
       kind=st.sampled_from(list(KINDS)), dtype=st.sampled_from(INTERPRETED_DTYPES),
       backend_name=st.sampled_from(BACKENDS))
def test_activation_hypothesis(monkeypatch, shape, std, kind, dtype, backend_name):
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    check_activation(kind, tuple(shape), dtype, std=std)


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    for _, _, pair in KINDS.values():
        assert torch.autograd.gradcheck(lambda x: pair(x, torch.ones_like(x))[0], (x,))


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_tangent_gives_zeros_and_empty_input_works(backend, kind):
    _, functional, pair = KINDS[kind]
    y, y_dot = pair(torch.randn(3, 4, device=DEVICE), None)
    assert torch.equal(y_dot, torch.zeros_like(y))
    empty = torch.randn(0, 4, device=DEVICE, requires_grad=True)
    y, y_dot = pair(empty, torch.randn(0, 4, device=DEVICE))
    assert y.shape == y_dot.shape == (0, 4)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_pair_op_takes_any_strides(backend, kind, layout):
    """The exported PairOp through apply_pair, without the functional's preparation: the Triton
    kernel reads memory linearly, so its launchers must take strided inputs, tangents and
    output gradients."""
    formula = KINDS[kind][0]

    def strided():
        t = torch.randn(6, 10, device=DEVICE)
        return t.t() if layout == "transposed" else t[:, ::2]

    x, x_dot, grad = strided(), strided(), strided()
    x.requires_grad_()
    y, y_dot = apply_pair(PAIR_OPS[kind], (x,), (x_dot,), (kind, backend))
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    y64, y_dot64 = torch.func.jvp(formula, (x64,), (x_dot.double(),))
    formula(x64).backward(grad.double())
    for name, ours, oracle in (("y", y, y64), ("y_dot", y_dot, y_dot64), ("dx", x.grad, x64.grad)):
        torch.testing.assert_close(ours.double(), oracle, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", list(KINDS))
def test_pair_form_on_dual_input_keeps_its_forward_ad_tangent(backend, kind):
    """Forward AD around the pair form (no input requires grad, grad mode off or on): y gets
    its tangent f'(x)·t, the pair tangent stays f'(x)·ẋ."""
    formula, _, pair = KINDS[kind]
    x, t, x_dot = (torch.randn(3, 7, device=DEVICE) for _ in range(3))
    for grad_mode in (True, False):
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            y, y_dot = pair(fwAD.make_dual(x, t), x_dot)
            tangent = fwAD.unpack_dual(y).tangent
        assert tangent is not None
        for ours, direction in ((tangent, t), (y_dot, x_dot)):
            expected = torch.func.jvp(formula, (x.double(),), (direction.double(),))[1]
            torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_double_backward(backend, kind):
    """A gradient penalty: backward with create_graph=True must give a gradient that carries its
    graph (the Triton kernels' gradients carry none, so that backward runs in plain torch)."""
    x = torch.randn(2, 3, 5, device=DEVICE)
    c = torch.randn_like(x)
    penalties = []
    for fn in (KINDS[kind][1], KINDS[kind][0]):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(leaf) * c).sum(), leaf, create_graph=True)
        assert g.requires_grad
        penalties.append(torch.autograd.grad(g.square().sum(), leaf)[0])
    torch.testing.assert_close(*penalties, rtol=1e-4, atol=1e-5)


def test_invalid_arguments_raise(monkeypatch):
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        jvp_silu([1.0, 2.0])
    with pytest.raises(ValueError, match="x must be one of"):
        jvp_gelu_tanh(torch.arange(4))
    with pytest.raises(ValueError, match="x_dot must have the shape"):
        jvp_silu_pair(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="x_dot must have the dtype"):
        jvp_gelu_tanh_pair(torch.randn(3), torch.randn(3).half())
    with pytest.raises(ValueError, match="x_dot must be on"):
        jvp_gelu_tanh_pair(torch.randn(3), torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="x must be a dense"):
        jvp_silu(torch.randn(3, 4).to_sparse())
    with pytest.raises(ValueError, match="x_dot must be a dense"):
        jvp_silu_pair(torch.randn(3, 4), torch.randn(3, 4).to_sparse())
    with pytest.raises(ValueError, match="forward-AD tangent of jvp_silu's x must have the dtype"):
        torch.func.jvp(jvp_silu, (torch.randn(3),), (torch.randn(3, dtype=torch.float64),))
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    with pytest.raises(ValueError, match="Triton backend"):
        jvp_silu(torch.randn(3, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="got meta tensors"):
        jvp_silu(torch.randn(3, device="meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(KINDS))
def test_flux_shape_bf16(monkeypatch, kind):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    formula, _, pair = KINDS[kind]
    x, xd = (torch.randn(1, 4608, 12288, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    y, y_dot = pair(x, xd)
    y64, y_dot64 = torch.func.jvp(formula, (x.double(),), (xd.double(),))
    base, base_dot = torch.func.jvp(formula, (x,), (xd,))
    for name, ours, oracle, baseline in (("y", y, y64, base), ("y_dot", y_dot, y_dot64, base_dot)):
        err = assert_close_to_oracle(name, ours, oracle, baseline)
        ratio = err / max((baseline.double() - oracle).norm().item() / oracle.norm().item(), 1e-30)
        print(f"jvp_{kind} {name}: rel err {err:.3e}, ratio to torch bf16 {ratio:.2f}")
