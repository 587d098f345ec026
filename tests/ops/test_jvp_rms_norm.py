"""jvp_rms_norm against torch's RMS norm in float64: primal, tangent and gradients, both backends.

On a CPU-only machine the Triton backend runs through the interpreter (fp32, fp16); bf16
kernels are checked by the `gpu` tests.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from meanflow.ops import jvp_rms_norm, jvp_rms_norm_pair
from meanflow.testing import assert_close_to_oracle, assert_gpu_errors, backend_dtypes, finite_or_none

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
INTERPRETED_DTYPES = [torch.float32, torch.float16]


def torch_rms_norm(x, weight, eps):
    """PyTorch's own RMS norm (what FLUX's attention calls): the oracle in float64, the baseline otherwise."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def make_inputs(shape, dtype, weight=True, std=1.0, device=DEVICE):
    def randn(*s, scale=1.0):
        return (torch.randn(*s, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = randn(*shape, scale=std)
    w = (1 + randn(shape[-1], scale=0.3).double()).to(dtype) if weight else None
    return x, w, torch.randn_like(x), None if w is None else torch.randn_like(w)


def jvp_and_grads(norm, x, w, x_dot, w_dot, grad_y, eps):
    """(y, y_dot, dx, dw) of ``norm`` through torch.func.jvp (tangents of x, and of w when w_dot), then backward."""
    x = x.detach().requires_grad_()
    w = None if w is None else w.detach().requires_grad_()
    if w_dot is not None:
        y, y_dot = torch.func.jvp(lambda x, w: norm(x, w, eps), (x, w), (x_dot, w_dot))
    else:
        y, y_dot = torch.func.jvp(lambda x: norm(x, w, eps), (x,), (x_dot,))
    params = (x,) if w is None else (x, w)
    grads = torch.autograd.grad(y, params, grad_y)
    return (y, y_dot, *grads)


def check_against_torch(shape, dtype, weight=True, weight_tangent=False, eps=1e-6, std=1.0):
    """Ours vs torch in float64 (oracle) and torch in ``dtype`` (baseline); returns the relative errors."""
    x, w, x_dot, w_dot = make_inputs(shape, dtype, weight, std)
    w_dot = w_dot if weight_tangent else None
    grad_y = torch.randn(shape, dtype=torch.float64).to(x.device, dtype)

    def double(t):
        return None if t is None else t.double()

    ours = jvp_and_grads(jvp_rms_norm, x, w, x_dot, w_dot, grad_y, eps)
    oracle = jvp_and_grads(torch_rms_norm, *(double(t) for t in (x, w, x_dot, w_dot, grad_y)), eps)
    baseline = (jvp_and_grads(torch_rms_norm, x, w, x_dot, w_dot, grad_y, eps)
                if dtype != torch.float64 else None)
    errors = {}
    for i, name in enumerate(("y", "y_dot", "dx", "dw")[:len(ours)]):
        assert ours[i].dtype == dtype, name
        errors[name] = assert_close_to_oracle(name, ours[i], oracle[i], finite_or_none(baseline, i))
    assert ours[1].grad_fn is None and not ours[1].requires_grad
    return errors


CASES = {
    "d48": dict(shape=(3, 48)),
    "d100_4d": dict(shape=(2, 5, 4, 100)),
    "flux_head_d128": dict(shape=(1, 9, 3, 128)),
    "no_weight": dict(shape=(2, 7, 100), weight=False),
    "weight_tangent": dict(shape=(2, 11, 48), weight_tangent=True),
    "large_values_eps_1e-5": dict(shape=(4, 64), std=30.0, eps=1e-5),
    "tiny_values": dict(shape=(5, 24), std=1e-2),
    "single_element_rows": dict(shape=(6, 1)),
}


@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_torch(backend, case_name):
    for dtype in backend_dtypes(backend):
        check_against_torch(dtype=dtype, **CASES[case_name])


def test_wide_rows_d3072(backend):
    check_against_torch((3, 3072), torch.float32, weight_tangent=True)


@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=2).map(tuple),
    dim=st.integers(1, 300),
    weight=st.booleans(),
    weight_tangent=st.booleans(),
    std=st.sampled_from([0.1, 1.0, 10.0]),
    eps=st.sampled_from([1e-6, 1e-3]),
    dtype=st.sampled_from(INTERPRETED_DTYPES),
    backend_name=st.sampled_from(BACKENDS),
)
def test_hypothesis(monkeypatch, shape, dim, weight, weight_tangent, std, eps, dtype, backend_name):
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    check_against_torch(shape + (dim,), dtype, weight, weight and weight_tangent, eps, std)


def test_matches_diffusers_rms_norm(backend):
    """A drop-in for diffusers' RMSNorm (and torch.nn.RMSNorm, which FLUX's attention uses)."""
    RMSNorm = pytest.importorskip("diffusers.models.normalization").RMSNorm

    x, w, x_dot, _ = make_inputs((2, 13, 3, 64), torch.float32)
    module = RMSNorm(64, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        module.weight.copy_(w)
    expected = torch.func.jvp(module, (x,), (x_dot,))
    ours = torch.func.jvp(lambda x: jvp_rms_norm(x, module.weight, module.eps), (x,), (x_dot,))
    torch.testing.assert_close(ours, expected, rtol=2e-6, atol=2e-6)
    torch_module = torch.nn.RMSNorm(64, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        torch_module.weight.copy_(w)
    torch.testing.assert_close(jvp_rms_norm(x, torch_module.weight, torch_module.eps), torch_module(x),
                               rtol=2e-6, atol=2e-6)


def test_eps_none_is_dtype_epsilon(backend):
    x = torch.randn(3, 32, device=DEVICE) * 1e-4
    torch.testing.assert_close(jvp_rms_norm(x, None, None), F.rms_norm(x, (32,)), rtol=1e-5, atol=1e-6)


def test_eps_none_on_half_inputs_is_float32_epsilon_as_torch(backend):
    """torch's default eps for 16-bit x is float32's (the dtype of its statistics), not x's own:
    at rms 1e-3 the two differ by a factor of 3 in the output."""
    x = (torch.randn(4, 64, device=DEVICE) * 1e-3).half()
    torch.testing.assert_close(jvp_rms_norm(x, None, None), F.rms_norm(x, (64,)), rtol=2e-3, atol=2e-3)


def test_output_dtype_promotes_with_the_weight(backend):
    x, w, x_dot, _ = make_inputs((3, 40), torch.float16)
    w32 = w.float()
    y, y_dot = jvp_rms_norm_pair(x, x_dot, w32, 1e-6)
    assert y.dtype == y_dot.dtype == torch.float32
    expected = torch.func.jvp(lambda x: torch_rms_norm(x.double(), w32.double(), 1e-6), (x,), (x_dot,))
    assert_close_to_oracle("y", y, expected[0].double(), magnitude=0)
    assert_close_to_oracle("y_dot", y_dot.half(), expected[1].double())


def test_forward_ad_dual_tensors_match_func_jvp(backend):
    x, w, x_dot, w_dot = make_inputs((2, 6, 48), torch.float32)
    y, y_dot = torch.func.jvp(lambda x, w: jvp_rms_norm(x, w, 1e-6), (x, w), (x_dot, w_dot))
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(jvp_rms_norm(fwAD.make_dual(x, x_dot), fwAD.make_dual(w, w_dot), 1e-6))
    torch.testing.assert_close(dual.primal, y, rtol=0, atol=0)
    torch.testing.assert_close(dual.tangent, y_dot, rtol=0, atol=0)


def test_pair_form_matches_func_jvp(backend):
    x, w, x_dot, w_dot = make_inputs((2, 7, 3, 100), torch.float32)
    expected = torch.func.jvp(lambda x, w: jvp_rms_norm(x, w, 1e-6), (x, w), (x_dot, w_dot))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y, y_dot = jvp_rms_norm_pair(xg, x_dot, wg, 1e-6, weight_dot=w_dot)
    torch.testing.assert_close((y, y_dot), expected, rtol=0, atol=0)
    assert y.grad_fn is not None and y_dot.grad_fn is None and not y_dot.requires_grad
    (y * y_dot).sum().backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    (torch_rms_norm(x64, w64, 1e-6) * expected[1].double()).sum().backward()
    assert_close_to_oracle("dx", xg.grad, x64.grad)
    assert_close_to_oracle("dw", wg.grad, w64.grad)


def test_pair_form_without_tangents_gives_zeros(backend):
    x, w, _, _ = make_inputs((4, 48), torch.float32)
    y, y_dot = jvp_rms_norm_pair(x, None, w)
    torch.testing.assert_close(y, torch_rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6)
    assert torch.equal(y_dot, torch.zeros_like(y))


def test_plain_forward_and_backward(backend):
    x, w, _, _ = make_inputs((3, 5, 100), torch.float32)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = jvp_rms_norm(xg, wg, 1e-6)
    y.square().sum().backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    expected = torch_rms_norm(x64, w64, 1e-6)
    expected.square().sum().backward()
    assert_close_to_oracle("y", y, expected)
    assert_close_to_oracle("dx", xg.grad, x64.grad)
    assert_close_to_oracle("dw", wg.grad, w64.grad)


@pytest.mark.parametrize("which", ["x", "weight", "both"])
def test_tangent_subsets_pass_only_present_tangents(backend, monkeypatch, which):
    impl = importlib.import_module(f"meanflow.{'kernels' if backend == 'triton' else 'reference'}.jvp_rms_norm")
    seen = []
    original = impl.jvp_rms_norm_forward

    def spy(x, weight, eps, x_dot=None, weight_dot=None):
        seen.append((x_dot is not None, weight_dot is not None))
        return original(x, weight, eps, x_dot, weight_dot)

    monkeypatch.setattr(impl, "jvp_rms_norm_forward", spy)
    x, w, x_dot, w_dot = make_inputs((5, 48), torch.float32)
    tangents = (x_dot if which != "weight" else torch.zeros_like(x), w_dot if which != "x" else torch.zeros_like(w))
    with fwAD.dual_level():
        # Forward AD's zero tangents (no make_dual) cost nothing; explicit zeros are passed on.
        xx = fwAD.make_dual(x, tangents[0]) if which != "weight" else x
        ww = fwAD.make_dual(w, tangents[1]) if which != "x" else w
        y_dot = fwAD.unpack_dual(jvp_rms_norm(xx, ww, 1e-6)).tangent
    assert seen == [(which != "weight", which != "x")]
    expected = torch.func.jvp(lambda x, w: torch_rms_norm(x, w, 1e-6), (x.double(), w.double()),
                              tuple(t.double() for t in tangents))[1]
    assert_close_to_oracle("y_dot", y_dot, expected)


@pytest.mark.parametrize("needs", ["x", "weight", "both"])
def test_backward_of_many_rows_and_gradient_subsets(backend, monkeypatch, needs):
    """Rows spread over several blocks per program (the weight gradient's partial sums), and only the
    gradients asked for, through the backend's own backward launcher."""
    impl = importlib.import_module(f"meanflow.{'kernels' if backend == 'triton' else 'reference'}.jvp_rms_norm")
    seen = []
    original = impl.jvp_rms_norm_backward

    def spy(grad_y, x, weight, eps, needs_x_grad, needs_weight_grad):
        seen.append((needs_x_grad, needs_weight_grad))
        return original(grad_y, x, weight, eps, needs_x_grad, needs_weight_grad)

    monkeypatch.setattr(impl, "jvp_rms_norm_backward", spy)
    x, w, x_dot, _ = make_inputs((3, 1000, 8), torch.float32)
    xg, wg = x.clone().requires_grad_(needs != "weight"), w.clone().requires_grad_(needs != "x")
    y, _ = jvp_rms_norm_pair(xg, x_dot, wg)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert seen == [(needs != "weight", needs != "x")]
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    torch_rms_norm(x64, w64, 1e-6).backward(grad_y.double())
    if needs != "weight":
        assert_close_to_oracle("dx", xg.grad, x64.grad)
    if needs != "x":
        assert_close_to_oracle("dw", wg.grad, w64.grad)


def test_backward_of_expanded_gradient(backend):
    """y.sum().backward() hands the backward a stride-0 gradient."""
    x, w, _, _ = make_inputs((5, 40), torch.float32)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    jvp_rms_norm(xg, wg).sum().backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    torch_rms_norm(x64, w64, 1e-6).sum().backward()
    assert_close_to_oracle("dx", xg.grad, x64.grad)
    assert_close_to_oracle("dw", wg.grad, w64.grad)


def test_strided_inputs(backend):
    """(B, N, H, d) transposed to (B, H, N, d), tangents in yet another layout, a non-unit last stride."""
    x = torch.randn(2, 9, 3, 48, device=DEVICE).transpose(1, 2)
    x_dot = torch.randn(2, 48, 3, 9, device=DEVICE).permute(0, 2, 3, 1)
    assert x_dot.stride(-1) != 1
    w = torch.randn(96, device=DEVICE)[::2]
    y, y_dot = torch.func.jvp(lambda x: jvp_rms_norm(x, w, 1e-6), (x,), (x_dot,))
    expected = torch.func.jvp(lambda x: torch_rms_norm(x, w.double(), 1e-6), (x.double(),), (x_dot.double(),))
    assert y.shape == x.shape
    assert_close_to_oracle("y", y, expected[0])
    assert_close_to_oracle("y_dot", y_dot, expected[1])


def test_empty_input(backend):
    x = torch.randn(0, 3, 16, device=DEVICE)
    y, y_dot = jvp_rms_norm_pair(x, torch.randn_like(x), torch.ones(16, device=DEVICE))
    assert y.shape == y_dot.shape == x.shape


def test_nested_jvp_raises(backend):
    x, w, x_dot, _ = make_inputs((3, 16), torch.float32)

    def inner_tangent(x):
        return torch.func.jvp(lambda x: jvp_rms_norm(x, w), (x,), (x_dot,))[1]

    with pytest.raises(ValueError, match="higher-order forward AD"):
        torch.func.jvp(inner_tangent, (x,), (x_dot,))


def test_func_grad(backend):
    """The backward is plain torch on both backends, so torch.func.grad works."""
    x, w, _, _ = make_inputs((3, 40), torch.float32)
    dx = torch.func.grad(lambda x: jvp_rms_norm(x, w).square().sum())(x)
    x64 = x.double().requires_grad_()
    torch_rms_norm(x64, w.double(), 1e-6).square().sum().backward()
    assert_close_to_oracle("dx", dx, x64.grad)


def test_double_backward(backend):
    """A gradient penalty: backward with create_graph=True must give a gradient that carries its
    graph (the Triton kernels' gradients carry none, so that backward runs in plain torch)."""
    x, w, _, _ = make_inputs((3, 40), torch.float32)
    c = torch.randn_like(x)
    penalties = []
    for fn in (lambda x: jvp_rms_norm(x, w), lambda x: torch_rms_norm(x, w, 1e-6)):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(leaf) * c).sum(), leaf, create_graph=True)
        assert g.requires_grad
        penalties.append(torch.autograd.grad(g.square().sum(), leaf)[0])
    torch.testing.assert_close(*penalties, rtol=1e-4, atol=1e-5)


def test_func_vjp(backend):
    """Under torch.func.vjp the cotangent is a plain tensor but the saved x and weight are
    wrapped: the backward routes them to the plain-torch reference, not into a kernel."""
    x, w, _, _ = make_inputs((3, 40), torch.float32)
    grad = torch.randn_like(x)
    _, vjp = torch.func.vjp(lambda x, w: jvp_rms_norm(x, w), x, w)
    dx, dw = vjp(grad)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    torch_rms_norm(x64, w64, 1e-6).backward(grad.double())
    assert_close_to_oracle("dx", dx, x64.grad)
    assert_close_to_oracle("dw", dw, w64.grad)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def _x(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (2, 16)), dtype=dtype)


@pytest.mark.parametrize("call, match", [
    (lambda: jvp_rms_norm("x"), "x must be a torch.Tensor"),
    (lambda: jvp_rms_norm(_x().int()), "x must be one of float16"),
    (lambda: jvp_rms_norm(_x().to_sparse()), "x must be a dense"),
    (lambda: jvp_rms_norm_pair(_x(), _x().to_sparse(), None), "x_dot must be a dense"),
    (lambda: jvp_rms_norm(torch.tensor(1.0)), "x must have a last dimension"),
    (lambda: jvp_rms_norm(_x(2, 0)), "x must have a last dimension"),
    (lambda: jvp_rms_norm(_x(), torch.ones(8)), r"weight must have shape \(16,\)"),
    (lambda: jvp_rms_norm(_x(), torch.ones(1, 16)), r"weight must have shape \(16,\)"),
    (lambda: jvp_rms_norm(_x(), torch.ones(16, dtype=torch.int32)), "weight must be one of float16"),
    (lambda: jvp_rms_norm(_x(), [1.0] * 16), "weight must be a torch.Tensor"),
    (lambda: jvp_rms_norm(_x(), torch.ones(16, device="meta")), "weight must be on x's device"),
    (lambda: jvp_rms_norm(_x(), None, -1.0), "eps must be"),
    (lambda: jvp_rms_norm(_x(), None, float("inf")), "eps must be"),
    (lambda: jvp_rms_norm(_x(), None, "1e-6"), "eps must be"),
    (lambda: jvp_rms_norm_pair(_x(), _x(2, 15), None), "x_dot must have the shape"),
    (lambda: jvp_rms_norm_pair(_x(), _x().half(), None), "x_dot must have the dtype"),
    (lambda: jvp_rms_norm_pair(_x(), _x().to("meta"), None), "x_dot must be on x's device"),
    (lambda: jvp_rms_norm_pair(_x(), "dx", None), "x_dot must be a torch.Tensor or None"),
    (lambda: jvp_rms_norm_pair(_x(), None, None, weight_dot=torch.ones(16)), "weight_dot is given but weight is None"),
    (lambda: jvp_rms_norm_pair(_x(), None, torch.ones(16), weight_dot=torch.ones(15)), "weight_dot must have the shape"),
    (lambda: jvp_rms_norm_pair(_x(), None, torch.ones(16), weight_dot=torch.ones(16).half()),
     "weight_dot must have the dtype"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_backend_errors(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    with pytest.raises(ValueError, match="x dtype torch.float64 is not supported by the Triton backend"):
        jvp_rms_norm(_x(dtype=torch.float64).to(DEVICE))
    with pytest.raises(ValueError, match="weight dtype torch.float64 is not supported by the Triton backend"):
        jvp_rms_norm(_x().to(DEVICE), torch.ones(16, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="rows of up to 8192"):
        jvp_rms_norm(_x(1, 8193).to(DEVICE))


# --------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at FLUX shapes against float64
# --------------------------------------------------------------------------------------------

GPU_SHAPES = {
    "flux_q_1x24x4608x128": (1, 24, 4608, 128),
    "ragged_d72": (2, 3, 1001, 72),
    "wide_d3072": (1, 517, 3072),
    "max_d8192": (3, 8192),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape_name", list(GPU_SHAPES))
def test_gpu_against_float64(monkeypatch, shape_name, dtype):
    """Prints the error of ours and of torch's RMS norm in the same dtype, both against float64."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    shape = GPU_SHAPES[shape_name]
    x, w, x_dot, w_dot = make_inputs(shape, dtype, device="cuda")
    grad_y = torch.randn(shape, device="cuda", dtype=dtype)
    ours = jvp_and_grads(jvp_rms_norm, x, w, x_dot, w_dot, grad_y, 1e-6)
    oracle = jvp_and_grads(torch_rms_norm, *(t.double() for t in (x, w, x_dot, w_dot, grad_y)), 1e-6)
    baseline = jvp_and_grads(torch_rms_norm, x, w, x_dot, w_dot, grad_y, 1e-6)
    assert_gpu_errors(f"rms_norm {shape_name}", dtype, ("y", "y_dot", "dx", "dw"), ours, oracle, baseline)


def test_pair_form_refuses_a_weight_that_is_not_a_tensor_by_name():
    with pytest.raises(ValueError, match="^weight must be a torch.Tensor"):
        jvp_rms_norm_pair(torch.randn(2, 8), torch.randn(2, 8), [1.0] * 8, 1e-6, weight_dot=torch.randn(8))
