"""alignment_loss against autograd of the plain formula ½‖x̂ − sg(x̂ − g)‖² in float64, both
backends (Triton through the interpreter on CPU: fp32, fp16)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from meanflow.ops import alignment_direction, alignment_loss
from meanflow.testing import assert_close_to_oracle, backend_dtypes, check_loss_under_transforms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
INTERPRETED_DTYPES = [torch.float32, torch.float16]
EPS = 1e-4


def formula(x_hat, x0_fake, x0_teacher, eps=EPS):
    """The specification (DESIGN §2, TDA steps 4–5), in whatever dtype it is given: (loss, per-sample)."""
    b = x_hat.shape[0]
    x, f, t = x_hat.reshape(b, -1), x0_fake.reshape(b, -1), x0_teacher.reshape(b, -1)
    denom = (x - t).abs().mean(1, keepdim=True).clamp_min(eps).detach()
    g = ((f - t) / denom).detach()
    per_sample = 0.5 * (x - (x - g).detach()).square().sum(1)
    return per_sample.mean(), per_sample


def _rand(shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def check_alignment(shape, dtype, *, scale=1.0, gap=0.3, equal=False, strided=False, grad_scale=1.0):
    """Compares loss, per-sample values and dx̂ with the float64 formula on the same (rounded)
    inputs; returns the relative errors."""
    b = shape[0]
    x0_teacher = _rand(shape, dtype, scale)
    x_hat = x0_teacher.clone() if equal else _rand(shape, dtype, scale)
    x0_fake = (x0_teacher.double() + gap * scale * _rand(shape, torch.float64)).to(dtype)
    if strided:  # rows of a wider buffer: unit inner stride, row stride > N
        n = x_hat[0].numel()
        wide = _rand((b, n + 3), dtype)
        wide[:, :n] = x_hat.reshape(b, n)
        x_hat, x0_fake, x0_teacher = wide[:, :n], x0_fake.reshape(b, n), x0_teacher.reshape(b, n)
    x_hat = x_hat.detach().requires_grad_(True)
    loss, per_sample = alignment_loss(x_hat, x0_fake, x0_teacher, eps=EPS)
    (grad_scale * loss).backward()
    x64 = x_hat.detach().double().requires_grad_(True)
    loss64, per64 = formula(x64, x0_fake.double(), x0_teacher.double())
    (grad_scale * loss64).backward()
    assert loss.shape == () and per_sample.shape == (b,)
    assert loss.dtype == per_sample.dtype == torch.promote_types(dtype, torch.float32)
    assert not per_sample.requires_grad
    assert x_hat.grad.dtype == dtype and x_hat.grad.shape == x_hat.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        "per_sample": assert_close_to_oracle("per_sample", per_sample.to(acc), per64, magnitude=0.0),
        "loss": assert_close_to_oracle("loss", loss.to(acc), loss64, magnitude=0.0),
        "grad": assert_close_to_oracle("dx_hat", x_hat.grad, x64.grad, magnitude=0.0),
    }


CASES = {
    "plain": dict(shape=(3, 4, 5, 6)),
    "ragged_2d": dict(shape=(5, 4096 + 5)),  # a few elements over one block
    "multi_block": dict(shape=(2, 3 * 4096 + 77)),  # several programs per sample, a ragged last
    "single_element": dict(shape=(1, 1)),
    "vector_batch": dict(shape=(4,)),
    "x_hat_is_teacher": dict(shape=(2, 30), equal=True),  # denominator at the eps floor
    "large_values": dict(shape=(2, 300), scale=30.0),
    "small_values": dict(shape=(2, 300), scale=1e-2),
    "strided_rows": dict(shape=(3, 70), strided=True),
    "grad_output_3": dict(shape=(2, 9), grad_scale=3.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_formula(backend, case):
    for dtype in backend_dtypes(backend):
        check_alignment(dtype=dtype, **CASES[case])


@given(b=st.integers(1, 5), inner=st.lists(st.integers(1, 23), min_size=0, max_size=3),
       dtype=st.sampled_from(INTERPRETED_DTYPES), backend_name=st.sampled_from(BACKENDS),
       scale=st.sampled_from([1e-2, 1.0, 10.0]), gap=st.sampled_from([1e-2, 0.3, 3.0]))
def test_hypothesis(monkeypatch, poison_empty, b, inner, dtype, backend_name, scale, gap):
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    check_alignment((b, *inner), dtype, scale=scale, gap=gap)


def test_gradient_is_exactly_g_over_batch(backend):
    """DESIGN §2 step 5: the gradient of the per-sample sum ½‖x̂ − sg(x̂ − g)‖² is g."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    b = 3
    x_hat = _rand((b, 2, 7), dtype).requires_grad_(True)
    x0_fake, x0_teacher = _rand((b, 2, 7), dtype), _rand((b, 2, 7), dtype)
    loss, per_sample = alignment_loss(x_hat, x0_fake, x0_teacher, eps=EPS)
    (grad,) = torch.autograd.grad(loss, x_hat)
    g = alignment_direction(x_hat, x0_fake, x0_teacher, eps=EPS)
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close((grad * b).to(g.dtype), g, rtol=tol, atol=tol)
    torch.testing.assert_close(per_sample.to(g.dtype), 0.5 * g.square().flatten(1).sum(1), rtol=tol, atol=tol)


def test_direction_of_a_vector_batch_is_per_sample():
    """A 1-D x̂ is B samples of one element: D_b = |x̂_b − x0_teacher,b|, not a batch mean."""
    g = alignment_direction(torch.zeros(3), torch.ones(3), torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(g, torch.tensor([0.0, -0.5, -0.75]), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 4)])
def test_direction_matches_the_per_sample_formula(shape):
    x, f, t = (torch.randn(*shape, dtype=torch.float64) for _ in range(3))
    expected = torch.stack([(fb - tb) / (xb - tb).abs().mean().clamp_min(EPS) for xb, fb, tb in zip(x, f, t)])
    torch.testing.assert_close(alignment_direction(x, f, t, eps=EPS), expected, rtol=1e-14, atol=0)


def test_direction_validates_like_the_loss():
    x, f, t = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="x0_fake must have x_hat's shape"):
        alignment_direction(x, f[:1], t)  # would broadcast
    with pytest.raises(ValueError, match="x0_teacher must have x_hat's dtype"):
        alignment_direction(x, f, t.double())
    with pytest.raises(ValueError, match="x_hat must be one of"):
        alignment_direction(x.int(), f.int(), t.int())
    with pytest.raises(ValueError, match="eps must be"):
        alignment_direction(x, f, t, eps=-1.0)


def test_eps_guard(monkeypatch):
    """x̂ equal to the teacher's estimate: the denominator is eps, the gradient
    (x0_fake − x0_teacher)/(B·eps)."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    t = torch.randn(2, 8, dtype=torch.float64)
    f = t + 1e-6
    x = t.clone().requires_grad_(True)
    loss, _ = alignment_loss(x, f, t, eps=1e-3)
    loss.backward()
    torch.testing.assert_close(x.grad, (f - t) / (2 * 1e-3), rtol=1e-12, atol=0)


def test_no_grad_and_deterministic(backend):
    x, f, t = (torch.randn(2, 40000, device=DEVICE) for _ in range(3))
    x.requires_grad_(True)
    first = alignment_loss(x, f, t)
    (g1,) = torch.autograd.grad(first[0], x)
    second = alignment_loss(x, f, t)
    (g2,) = torch.autograd.grad(second[0], x)
    assert torch.equal(first[0], second[0]) and torch.equal(g1, g2)
    with torch.no_grad():
        third = alignment_loss(x, f, t)
    assert third[0].grad_fn is None and torch.equal(third[0], first[0])


def test_invalid_arguments_raise():
    x, f, t = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="x0_fake must have x_hat's shape"):
        alignment_loss(x, f[:, :4], t)
    with pytest.raises(ValueError, match="x0_teacher must have x_hat's shape"):
        alignment_loss(x, f, t[:1])
    with pytest.raises(ValueError, match="x0_teacher must have x_hat's dtype"):
        alignment_loss(x, f, t.double())
    with pytest.raises(ValueError, match="x0_fake must be on"):
        alignment_loss(x, f.to("meta"), t)
    with pytest.raises(ValueError, match="x_hat must be one of"):
        alignment_loss(x.int(), f, t)
    with pytest.raises(ValueError, match="x_hat must be"):
        alignment_loss(torch.randn(0, 3), torch.randn(0, 3), torch.randn(0, 3))
    for eps in (0.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            alignment_loss(x, f, t, eps=eps)
    with pytest.raises(ValueError, match="x_hat must be a dense"):
        alignment_loss(x.to_sparse(), f, t)


def test_triton_rejects_float64(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    x = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="x_hat dtype torch.float64 is not supported"):
        alignment_loss(x, x.clone(), x.clone())


@pytest.mark.gpu
def test_flux_latent_bf16(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    errors = check_alignment((8, 4096, 64), torch.bfloat16)
    print("alignment_loss bf16 rel errors:", errors)


def test_double_backward_is_refused(backend):
    """The gradient comes from a residual saved without its graph: backward with create_graph=True
    must raise rather than drop the loss's part of the second derivative."""
    x_hat = torch.randn(3, 21, device=DEVICE, requires_grad=True)
    x0_fake, x0_teacher = torch.randn(3, 21, device=DEVICE), torch.randn(3, 21, device=DEVICE)
    loss = alignment_loss(x_hat, x0_fake, x0_teacher)[0]
    with pytest.raises(ValueError, match="alignment_loss does not support double backward"):
        torch.autograd.grad(loss, x_hat, create_graph=True)
    loss.backward()
    assert x_hat.grad is not None


def test_torch_func_transforms_and_forward_ad(backend):
    """The Function has no jvp or setup_context form: under transforms the op runs its formula as
    plain torch ops, which must give .backward()'s gradient g / B (it used to fail with torch's error)."""
    x_hat, x0_fake, x0_teacher = (torch.randn(3, 5, 4) for _ in range(3))
    check_loss_under_transforms(lambda a: alignment_loss(a, x0_fake, x0_teacher)[0], x_hat)
