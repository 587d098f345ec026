"""jvp_layer_norm_modulate against LayerNorm + modulation in float64: primal, tangent, gradients.

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

from meanflow.ops import jvp_layer_norm_modulate, jvp_layer_norm_modulate_pair
from meanflow.testing import assert_close_to_oracle, assert_gpu_errors, backend_dtypes, finite_or_none

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
INTERPRETED_DTYPES = [torch.float32, torch.float16]
NAMES = ("y", "y_dot", "dx", "dscale", "dshift")


def torch_modulate(x, scale, shift, eps=1e-6):
    """FLUX's ``norm(x) * (1 + scale[:, None]) + shift[:, None]`` in x's dtype (float64: the oracle)."""
    if scale.dim() == 2:
        scale, shift = scale[:, None], shift[:, None]
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def make_inputs(batch, tokens, dim, dtype, std=1.0, mean=0.0, per_batch_3d=False, device=DEVICE):
    def randn(*s, scale=1.0, offset=0.0):
        return (torch.randn(*s, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)

    mod_shape = (batch, 1, dim) if per_batch_3d else (batch, dim)
    primals = (randn(batch, tokens, dim, scale=std, offset=mean), randn(*mod_shape, scale=0.5), randn(*mod_shape))
    return primals, tuple(torch.randn_like(t) for t in primals)


def jvp_and_grads(fn, primals, tangents, grad_y, eps):
    """(y, y_dot, dx, dscale, dshift) of ``fn`` through torch.func.jvp with the given tangents, then backward."""
    primals = tuple(p.detach().requires_grad_() for p in primals)
    y, y_dot = torch.func.jvp(lambda x, s, h: fn(x, s, h, eps), primals, tangents)
    return (y, y_dot, *torch.autograd.grad(y, primals, grad_y))


def check_against_torch(batch, tokens, dim, dtype, eps=1e-6, std=1.0, mean=0.0, per_batch_3d=False):
    primals, tangents = make_inputs(batch, tokens, dim, dtype, std, mean, per_batch_3d)
    grad_y = torch.randn(batch, tokens, dim, dtype=torch.float64).to(primals[0].device, dtype)
    ours = jvp_and_grads(jvp_layer_norm_modulate, primals, tangents, grad_y, eps)
    oracle = jvp_and_grads(torch_modulate, tuple(p.double() for p in primals), tuple(t.double() for t in tangents),
                           grad_y.double(), eps)
    baseline = jvp_and_grads(torch_modulate, primals, tangents, grad_y, eps) if dtype != torch.float64 else None
    # x's gradient sums (1 + scale)·grad over D before cancelling: judge it at that size.
    magnitude = {"dx": 1.0 + 1.0 / max(std, 1e-3)}
    errors = {}
    for i, name in enumerate(NAMES):
        assert ours[i].dtype == dtype and ours[i].shape == oracle[i].shape, name
        errors[name] = assert_close_to_oracle(name, ours[i], oracle[i], finite_or_none(baseline, i),
                                              magnitude=magnitude.get(name, 1.0))
    assert ours[1].grad_fn is None and not ours[1].requires_grad
    return errors


CASES = {
    "d48": dict(batch=2, tokens=7, dim=48),
    "d100_3d_modulation": dict(batch=3, tokens=5, dim=100, per_batch_3d=True),
    "single_token": dict(batch=2, tokens=1, dim=64),
    "offset_values": dict(batch=1, tokens=9, dim=40, std=3.0, mean=5.0),
    "small_values_eps_1e-5": dict(batch=2, tokens=4, dim=32, std=1e-2, eps=1e-5),
    "d1": dict(batch=2, tokens=3, dim=1),
}


@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_torch(backend, case_name):
    for dtype in backend_dtypes(backend):
        check_against_torch(dtype=dtype, **CASES[case_name])


def test_flux_hidden_d3072(backend):
    check_against_torch(2, 3, 3072, torch.float32)


@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 12),
    dim=st.integers(1, 300),
    std=st.sampled_from([0.1, 1.0, 10.0]),
    mean=st.sampled_from([0.0, 2.0]),
    per_batch_3d=st.booleans(),
    dtype=st.sampled_from(INTERPRETED_DTYPES),
    backend_name=st.sampled_from(BACKENDS),
)
def test_hypothesis(monkeypatch, batch, tokens, dim, std, mean, per_batch_3d, dtype, backend_name):
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    check_against_torch(batch, tokens, dim, dtype, std=std, mean=mean, per_batch_3d=per_batch_3d)


def test_matches_diffusers_ada_layer_norm_zero(backend):
    """The first output of diffusers' AdaLayerNormZero, with its scale and shift from the embedding."""
    AdaLayerNormZero = pytest.importorskip("diffusers.models.normalization").AdaLayerNormZero

    module = AdaLayerNormZero(64).to(DEVICE)
    x, emb = torch.randn(2, 10, 64, device=DEVICE), torch.randn(2, 64, device=DEVICE)
    with torch.no_grad():
        expected = module(x, emb=emb)[0]
        shift, scale = module.linear(module.silu(emb)).chunk(6, dim=1)[:2]
        torch.testing.assert_close(jvp_layer_norm_modulate(x, scale, shift), expected, rtol=2e-5, atol=2e-5)


def test_forward_ad_dual_tensors_match_func_jvp(backend):
    primals, tangents = make_inputs(2, 6, 48, torch.float32)
    y, y_dot = torch.func.jvp(jvp_layer_norm_modulate, primals, tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        dual = fwAD.unpack_dual(jvp_layer_norm_modulate(*duals))
    torch.testing.assert_close(dual.primal, y, rtol=0, atol=0)
    torch.testing.assert_close(dual.tangent, y_dot, rtol=0, atol=0)


def test_pair_form_matches_func_jvp(backend):
    primals, tangents = make_inputs(3, 7, 100, torch.float32, per_batch_3d=True)
    expected = torch.func.jvp(jvp_layer_norm_modulate, primals, tangents)
    x, s, h = (p.clone().requires_grad_() for p in primals)
    y, y_dot = jvp_layer_norm_modulate_pair(x, tangents[0], s, tangents[1], h, tangents[2])
    torch.testing.assert_close((y, y_dot), expected, rtol=0, atol=0)
    assert y.grad_fn is not None and y_dot.grad_fn is None and not y_dot.requires_grad
    (y * y_dot).sum().backward()
    ps = tuple(p.double().requires_grad_() for p in primals)
    (torch_modulate(*ps) * expected[1].double()).sum().backward()
    for name, ours, oracle in zip(NAMES[2:], (x, s, h), ps):
        assert ours.grad.shape == ours.shape
        assert_close_to_oracle(name, ours.grad, oracle.grad)


def test_pair_form_without_tangents_gives_zeros(backend):
    primals, _ = make_inputs(2, 5, 48, torch.float32)
    y, y_dot = jvp_layer_norm_modulate_pair(primals[0], None, primals[1], None, primals[2], None)
    torch.testing.assert_close(y, torch_modulate(*primals), rtol=1e-5, atol=1e-5)
    assert torch.equal(y_dot, torch.zeros_like(y))


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (1, 2), (0, 2)])
def test_tangent_subsets_pass_only_present_tangents(backend, monkeypatch, which):
    impl = importlib.import_module(
        f"meanflow.{'kernels' if backend == 'triton' else 'reference'}.jvp_layer_norm_modulate")
    seen = []
    original = impl.jvp_layer_norm_modulate_forward

    def spy(x, scale, shift, x_dot, scale_dot, shift_dot, eps):
        seen.append(tuple(t is not None for t in (x_dot, scale_dot, shift_dot)))
        return original(x, scale, shift, x_dot, scale_dot, shift_dot, eps)

    monkeypatch.setattr(impl, "jvp_layer_norm_modulate_forward", spy)
    primals, tangents = make_inputs(2, 5, 72, torch.float32)
    given_tangents = tuple(t if i in which else None for i, t in enumerate(tangents))
    _, y_dot = jvp_layer_norm_modulate_pair(primals[0], given_tangents[0], primals[1], given_tangents[1],
                                            primals[2], given_tangents[2])
    assert seen == [tuple(i in which for i in range(3))]
    zeros = tuple(t if i in which else torch.zeros_like(t) for i, t in enumerate(tangents))
    expected = torch.func.jvp(torch_modulate, tuple(p.double() for p in primals), tuple(t.double() for t in zeros))[1]
    assert_close_to_oracle("y_dot", y_dot, expected)


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (1, 2), (0, 1, 2)])
def test_backward_of_many_tokens_and_gradient_subsets(backend, monkeypatch, which):
    """Tokens spread over several blocks per program (the scale / shift gradients' partial sums),
    and only the gradients asked for, through the backend's own backward launcher."""
    impl = importlib.import_module(
        f"meanflow.{'kernels' if backend == 'triton' else 'reference'}.jvp_layer_norm_modulate")
    seen = []
    original = impl.jvp_layer_norm_modulate_backward

    def spy(grad_y, x, scale, shift, eps, needs_input_grad):
        seen.append(tuple(needs_input_grad))
        return original(grad_y, x, scale, shift, eps, needs_input_grad)

    monkeypatch.setattr(impl, "jvp_layer_norm_modulate_backward", spy)
    primals, tangents = make_inputs(2, 1500, 12, torch.float32, per_batch_3d=True)
    ours = tuple(p.clone().requires_grad_(i in which) for i, p in enumerate(primals))
    y, _ = jvp_layer_norm_modulate_pair(ours[0], tangents[0], ours[1], tangents[1], ours[2], tangents[2])
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert seen == [tuple(i in which for i in range(3))]
    oracle = tuple(p.double().requires_grad_() for p in primals)
    torch_modulate(*oracle).backward(grad_y.double())
    for i in which:
        assert_close_to_oracle(NAMES[2 + i], ours[i].grad, oracle[i].grad)


def test_backward_of_expanded_gradient(backend):
    """y.sum().backward() hands the backward a stride-0 gradient."""
    primals, _ = make_inputs(2, 5, 40, torch.float32)
    ours = tuple(p.clone().requires_grad_() for p in primals)
    jvp_layer_norm_modulate(*ours).sum().backward()
    oracle = tuple(p.double().requires_grad_() for p in primals)
    torch_modulate(*oracle).sum().backward()
    for i in range(3):
        assert_close_to_oracle(NAMES[2 + i], ours[i].grad, oracle[i].grad, magnitude=10.0)


def test_strided_inputs(backend):
    """x as a (N, B, D) buffer seen as (B, N, D); scale and shift as chunks of one embedding, as FLUX."""
    x = torch.randn(9, 2, 48, device=DEVICE).transpose(0, 1)
    x_dot = torch.randn(2, 48, 9, device=DEVICE).transpose(1, 2)
    assert x_dot.stride(-1) != 1
    emb, emb_dot = torch.randn(2, 6 * 48, device=DEVICE), torch.randn(2, 6 * 48, device=DEVICE)
    (shift, scale), (shift_dot, scale_dot) = emb.chunk(6, 1)[:2], emb_dot.chunk(6, 1)[:2]
    y, y_dot = jvp_layer_norm_modulate_pair(x, x_dot, scale, scale_dot, shift, shift_dot)
    expected = torch.func.jvp(torch_modulate, tuple(t.double() for t in (x, scale, shift)),
                              tuple(t.double() for t in (x_dot, scale_dot, shift_dot)))
    assert_close_to_oracle("y", y, expected[0])
    assert_close_to_oracle("y_dot", y_dot, expected[1])


def test_mixed_dtypes_promote(backend):
    """A float32 residual stream modulated by float16 scale / shift gives float32, as torch would."""
    (x, s, h), (xd, sd, hd) = make_inputs(2, 4, 40, torch.float32)
    s16, h16, sd16, hd16 = (t.half() for t in (s, h, sd, hd))
    y, y_dot = jvp_layer_norm_modulate_pair(x, xd, s16, sd16, h16, hd16)
    assert y.dtype == y_dot.dtype == torch.float32
    expected = torch.func.jvp(torch_modulate, tuple(t.double() for t in (x, s16, h16)),
                              tuple(t.double() for t in (xd, sd16, hd16)))
    assert_close_to_oracle("y", y, expected[0])
    assert_close_to_oracle("y_dot", y_dot, expected[1])


def test_empty_input(backend):
    (x, s, h), _ = make_inputs(2, 0, 16, torch.float32)
    y, y_dot = jvp_layer_norm_modulate_pair(x, torch.randn_like(x), s, None, h, None)
    assert y.shape == y_dot.shape == x.shape


def test_nested_jvp_raises(backend):
    (x, s, h), (x_dot, _, _) = make_inputs(1, 3, 16, torch.float32)

    def inner_tangent(x):
        return torch.func.jvp(lambda x: jvp_layer_norm_modulate(x, s, h), (x,), (x_dot,))[1]

    with pytest.raises(ValueError, match="higher-order forward AD"):
        torch.func.jvp(inner_tangent, (x,), (x_dot,))


def test_func_grad(backend):
    """The backward is plain torch on both backends, so torch.func.grad works."""
    (x, s, h), _ = make_inputs(2, 3, 40, torch.float32)
    grads = torch.func.grad(lambda x, s: jvp_layer_norm_modulate(x, s, h).square().sum(), argnums=(0, 1))(x, s)
    x64, s64 = x.double().requires_grad_(), s.double().requires_grad_()
    torch_modulate(x64, s64, h.double()).square().sum().backward()
    assert_close_to_oracle("dx", grads[0], x64.grad)
    assert_close_to_oracle("dscale", grads[1], s64.grad)


def test_double_backward(backend):
    """A gradient penalty: backward with create_graph=True must give a gradient that carries its
    graph (the Triton kernels' gradients carry none, so that backward runs in plain torch)."""
    (x, s, h), _ = make_inputs(2, 3, 40, torch.float32)
    x, s, h = x.detach(), s.detach(), h.detach()
    c = torch.randn_like(x)
    penalties = []
    for fn in (lambda x: jvp_layer_norm_modulate(x, s, h), lambda x: torch_modulate(x, s, h)):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(leaf) * c).sum(), leaf, create_graph=True)
        assert g.requires_grad
        penalties.append(torch.autograd.grad(g.square().sum(), leaf)[0])
    torch.testing.assert_close(*penalties, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def _args(x=(2, 3, 16), scale=(2, 16), shift=(2, 16), dtype=torch.float32):
    return [torch.randn(*s).to(dtype) for s in (x, scale, shift)]


def _with(i, value):
    args = _args()
    args[i] = value
    return args


@pytest.mark.parametrize("call, match", [
    (lambda: jvp_layer_norm_modulate("x", *_args()[1:]), "x must be a torch.Tensor"),
    (lambda: jvp_layer_norm_modulate(*_args(dtype=torch.int64)), "x must be one of float16"),
    (lambda: jvp_layer_norm_modulate(*_with(1, torch.randn(2, 16).to_sparse())), "scale must be a dense"),
    (lambda: jvp_layer_norm_modulate(*_args(x=(3, 16))), r"x must be \(B, N, D\)"),
    (lambda: jvp_layer_norm_modulate(*_args(x=(2, 3, 0), scale=(2, 0), shift=(2, 0))), r"x must be \(B, N, D\)"),
    (lambda: jvp_layer_norm_modulate(*_args(scale=(2, 15))), r"scale must be \(B, D\)"),
    (lambda: jvp_layer_norm_modulate(*_args(scale=(1, 16))), r"scale must be \(B, D\)"),
    (lambda: jvp_layer_norm_modulate(*_args(scale=(2, 3, 16))), r"scale must be \(B, D\)"),
    (lambda: jvp_layer_norm_modulate(*_args(shift=(16,))), r"shift must be \(B, D\)"),
    (lambda: jvp_layer_norm_modulate(*_with(1, torch.randn(2, 16).int())), "scale must be one of float16"),
    (lambda: jvp_layer_norm_modulate(*_with(2, 0.0)), "shift must be a torch.Tensor"),
    (lambda: jvp_layer_norm_modulate(*_with(1, torch.randn(2, 16, device="meta"))), "scale must be on x's device"),
    (lambda: jvp_layer_norm_modulate(*_with(2, torch.randn(2, 16, device="meta"))), "shift must be on x's device"),
    (lambda: jvp_layer_norm_modulate(*_args(), eps=-1e-6), "eps must be"),
    (lambda: jvp_layer_norm_modulate(*_args(), eps=None), "eps must be"),
    (lambda: jvp_layer_norm_modulate_pair(_args()[0], torch.randn(2, 3, 15), *_args()[1:2], None, _args()[2], None),
     "x_dot must have the shape"),
    (lambda: jvp_layer_norm_modulate_pair(_args()[0], None, _args()[1], torch.randn(2, 16).half(), _args()[2], None),
     "scale_dot must have the dtype"),
    (lambda: jvp_layer_norm_modulate_pair(_args()[0], None, _args()[1], None, _args()[2], torch.randn(2, 1, 16)),
     "shift_dot must have the shape"),
    (lambda: jvp_layer_norm_modulate_pair(_args()[0], None, _args()[1], None, _args()[2],
                                          torch.randn(2, 16, device="meta")), "shift_dot must be on shift's device"),
    (lambda: jvp_layer_norm_modulate_pair(_args()[0], [0.0], *_args()[1:2], None, _args()[2], None),
     "x_dot must be a torch.Tensor or None"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_backend_errors(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    with pytest.raises(ValueError, match="x dtype torch.float64 is not supported by the Triton backend"):
        jvp_layer_norm_modulate(*(t.to(DEVICE) for t in _args(dtype=torch.float64)))
    x, s, h = (t.to(DEVICE) for t in _args())
    with pytest.raises(ValueError, match="shift dtype torch.float64 is not supported by the Triton backend"):
        jvp_layer_norm_modulate(x, s, h.double())
    with pytest.raises(ValueError, match="rows of up to 8192"):
        jvp_layer_norm_modulate(*(t.to(DEVICE) for t in _args(x=(1, 1, 8200), scale=(1, 8200), shift=(1, 8200))))


# --------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at FLUX shapes against float64
# --------------------------------------------------------------------------------------------

GPU_SHAPES = {
    "flux_img_1x4608x3072": (1, 4608, 3072),
    "flux_txt_2x512x3072": (2, 512, 3072),
    "ragged_3x1001x1000": (3, 1001, 1000),
    "max_d8192": (2, 37, 8192),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape_name", list(GPU_SHAPES))
def test_gpu_against_float64(monkeypatch, shape_name, dtype):
    """Prints the error of ours and of FLUX's torch computation in the same dtype, both against float64."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    batch, tokens, dim = GPU_SHAPES[shape_name]
    primals, tangents = make_inputs(batch, tokens, dim, dtype, device="cuda")
    grad_y = torch.randn(batch, tokens, dim, device="cuda", dtype=dtype)
    ours = jvp_and_grads(jvp_layer_norm_modulate, primals, tangents, grad_y, 1e-6)
    oracle = jvp_and_grads(torch_modulate, tuple(p.double() for p in primals), tuple(t.double() for t in tangents),
                           grad_y.double(), 1e-6)
    baseline = jvp_and_grads(torch_modulate, primals, tangents, grad_y, 1e-6)
    assert_gpu_errors(f"layer_norm_modulate {shape_name}", dtype, NAMES, ours, oracle, baseline)


def test_constant_and_offset_rows_normalize_exactly(backend):
    """A constant row normalizes to exactly 0 (y = shift, ẏ = ẋ's part 0), as F.layer_norm gives:
    the mean is taken as x₀ + mean(x − x₀). A plain mean rounded to c + δ, and 1/sqrt(eps)
    turned δ into c·7e-5. A row with a large offset keeps float32's accuracy at its spread."""
    scale, shift = torch.randn(2, 40), torch.randn(2, 40)
    x = torch.full((2, 3, 40), 3.7)
    x[1] = -1234.5678
    y, y_dot = jvp_layer_norm_modulate_pair(x, torch.zeros_like(x), scale, None, shift, None)
    assert torch.equal(y, shift[:, None, :].expand_as(y))
    assert not y_dot.any()
    x.requires_grad_()
    grad_y = torch.randn(2, 3, 40)
    jvp_layer_norm_modulate(x, scale, shift).backward(grad_y)
    expected = torch.func.vjp(lambda a: F.layer_norm(a, (40,), eps=1e-6), x.detach().double())[1](
        (grad_y * (1 + scale[:, None, :])).double())[0]
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-4)  # |dx| ~ 1/sqrt(eps) = 1e3

    offset = 1000.0 + 1e-2 * torch.randn(2, 3, 40)
    y = jvp_layer_norm_modulate(offset, scale, shift)
    exact = F.layer_norm(offset.double(), (40,), eps=1e-6) * (1 + scale[:, None].double()) \
        + shift[:, None].double()
    # x − μ carries float32's rounding of 1000 (6e-5), divided by σ = 1e-2
    assert (y.double() - exact).abs().max() < 2e-2
