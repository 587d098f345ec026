"""adaptive_weighted_loss against autograd of the plain formula in float64, both backends
(Triton through the interpreter on CPU: fp32, fp16)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from meanflow.ops import adaptive_weighted_loss
from meanflow.testing import assert_close_to_oracle, backend_dtypes, check_loss_under_transforms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
INTERPRETED_DTYPES = [torch.float32, torch.float16]


def formula(u, u_tgt, weights=None, p=1.0, c=1e-3):
    """The specification, in whatever dtype it is given: (loss, L)."""
    per_sample = (u - u_tgt.detach()).square().reshape(u.shape[0], -1).sum(1)
    w = 1.0 / (per_sample.detach() + c) ** p
    if weights is not None:
        w = w * weights
    return (w * per_sample).mean(), per_sample


def check_loss(shape, dtype, *, weights="none", p=1.0, c=1e-3, scale=1.0, gap=1.0, strided=False,
               grad_scale=1.0):
    """Compares loss, L and du with the float64 formula on the same (rounded) inputs; returns the
    relative errors."""
    b = shape[0]
    base = torch.randn(*shape, dtype=torch.float64) * scale
    u = base.to(device=DEVICE, dtype=dtype)
    u_tgt = (base + gap * scale * torch.randn(*shape, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)
    if strided:  # rows of a wider buffer: unit inner stride, row stride > N
        n = u[0].numel()
        wide = torch.randn(b, n + 5, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
        wide[:, :n] = u.reshape(b, n)
        u = wide[:, :n].view(b, n)
        u_tgt = u_tgt.reshape(b, n)
    w = None
    if weights == "random":
        w = torch.rand(b, dtype=torch.float64).to(DEVICE)
    elif weights == "mask":
        w = (torch.arange(b, device=DEVICE) % 2 == 0).to(torch.float32)
    u = u.detach().requires_grad_(True)
    loss, per_sample = adaptive_weighted_loss(u, u_tgt, w, p=p, c=c)
    (grad_scale * loss).backward()
    u64 = u.detach().double().requires_grad_(True)
    loss64, per64 = formula(u64, u_tgt.double(), None if w is None else w.double(), p, c)
    (grad_scale * loss64).backward()
    assert loss.shape == () and per_sample.shape == (b,)
    assert loss.dtype == per_sample.dtype == torch.promote_types(dtype, torch.float32)
    assert per_sample.grad_fn is None and not per_sample.requires_grad
    assert u.grad.dtype == dtype and u.grad.shape == u.shape
    # Accumulation is in float32 whatever the input dtype: the sums meet float32's floor.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    errors = {
        "L": assert_close_to_oracle("L", per_sample.to(acc), per64, magnitude=0.0),
        "loss": assert_close_to_oracle("loss", loss.to(acc), loss64, magnitude=0.0),
        "grad": assert_close_to_oracle("du", u.grad, u64.grad, magnitude=0.0),
    }
    return errors


CASES = {
    "plain": dict(shape=(3, 4, 5, 6)),
    "ragged_2d": dict(shape=(5, 4096 + 5)),  # a few elements over one block
    "multi_block": dict(shape=(2, 3 * 4096 + 77)),  # several programs per sample, a ragged last
    "single_element": dict(shape=(1, 1)),
    "vector_batch": dict(shape=(4,)),  # (B,): one element per sample
    "random_weights": dict(shape=(3, 33), weights="random"),
    "mask": dict(shape=(4, 2, 17), weights="mask"),
    "p0_plain_l2": dict(shape=(2, 50), p=0.0),
    "p075_c1e-2": dict(shape=(2, 50), p=0.75, c=1e-2),
    "small_residual": dict(shape=(3, 40), gap=1e-3),  # L ~ c: the weight's offset matters
    "large_values": dict(shape=(2, 300), scale=30.0),
    "strided_rows": dict(shape=(3, 70), strided=True),
    "grad_output_3": dict(shape=(2, 9), grad_scale=3.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_formula(backend, case):
    for dtype in backend_dtypes(backend):
        check_loss(dtype=dtype, **CASES[case])


@given(b=st.integers(1, 5), inner=st.lists(st.integers(1, 23), min_size=0, max_size=3),
       dtype=st.sampled_from(INTERPRETED_DTYPES), backend_name=st.sampled_from(BACKENDS),
       weights=st.sampled_from(["none", "random", "mask"]), p=st.sampled_from([0.0, 0.5, 1.0]),
       scale=st.sampled_from([1e-2, 1.0, 10.0]), gap=st.sampled_from([1e-2, 1.0]))
def test_hypothesis(monkeypatch, poison_empty, b, inner, dtype, backend_name, weights, p, scale, gap):
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    check_loss((b, *inner), dtype, weights=weights, p=p, scale=scale, gap=gap)


def test_no_grad_paths(backend):
    u, t = torch.randn(3, 21, device=DEVICE), torch.randn(3, 21, device=DEVICE)
    loss, per_sample = adaptive_weighted_loss(u, t)
    ref, ref_l = formula(u.double(), t.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    with torch.no_grad():
        loss2, _ = adaptive_weighted_loss(u.requires_grad_(True), t)
    assert loss2.grad_fn is None and torch.equal(loss, loss2)


def test_deterministic(backend):
    u, t = torch.randn(2, 40000, device=DEVICE, requires_grad=True), torch.randn(2, 40000, device=DEVICE)
    first = adaptive_weighted_loss(u, t)
    (g1,) = torch.autograd.grad(first[0], u)
    second = adaptive_weighted_loss(u, t)
    (g2,) = torch.autograd.grad(second[0], u)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and torch.equal(g1, g2)


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    u = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    # The weight is under a stop-gradient, so compare to the formula rather than gradcheck the value.
    (ours,) = torch.autograd.grad(adaptive_weighted_loss(u, t, p=0.0)[0], u)
    assert torch.autograd.gradcheck(lambda u: adaptive_weighted_loss(u, t, p=0.0)[0], (u,))
    (ref,) = torch.autograd.grad(formula(u, t, p=0.0)[0], u)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_exact_weight_at_known_value(monkeypatch):
    """L = 4 per sample, c = 1e-3, p = 1: loss = 4 / 4.001, du = (2/B)·(u − u_tgt)/4.001."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    u = torch.ones(2, 4, dtype=torch.float64, requires_grad=True)
    loss, per_sample = adaptive_weighted_loss(u, torch.zeros(2, 4, dtype=torch.float64))
    loss.backward()
    assert math.isclose(loss.item(), 4 / 4.001, rel_tol=1e-14)
    assert torch.equal(per_sample, torch.full((2,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(u.grad, torch.full((2, 4), 1 / 4.001, dtype=torch.float64), rtol=1e-14, atol=0)


def test_invalid_arguments_raise():
    u, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="u_tgt must have u's shape"):
        adaptive_weighted_loss(u, t[:, :4])
    with pytest.raises(ValueError, match="u_tgt must have u's dtype"):
        adaptive_weighted_loss(u, t.double())
    with pytest.raises(ValueError, match="u_tgt must be on"):
        adaptive_weighted_loss(u, t.to("meta"))
    with pytest.raises(ValueError, match="u must be one of"):
        adaptive_weighted_loss(u.int(), t)
    with pytest.raises(ValueError, match="u must be"):
        adaptive_weighted_loss(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="weights must be"):
        adaptive_weighted_loss(u, t, torch.ones(3))
    for p in (-1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="p must be a finite number >= 0"):
            adaptive_weighted_loss(u, t, p=p)
    for c in (0.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="c must be a finite number > 0"):
            adaptive_weighted_loss(u, t, c=c)
    with pytest.raises(ValueError, match="u must be a dense"):
        adaptive_weighted_loss(u.to_sparse(), t)


def test_triton_rejects_float64(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    u = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="u dtype torch.float64 is not supported"):
        adaptive_weighted_loss(u, u.clone())


@pytest.mark.gpu
def test_flux_latent_bf16(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    errors = check_loss((8, 4096, 64), torch.bfloat16)
    print("adaptive_weighted_loss bf16 rel errors:", errors)


def test_double_backward_is_refused(backend):
    """The gradient comes from a residual saved without its graph: backward with create_graph=True
    (a gradient penalty) must raise rather than drop the loss's part of the second derivative."""
    u, t = torch.randn(3, 21, device=DEVICE, requires_grad=True), torch.randn(3, 21, device=DEVICE)
    loss, _ = adaptive_weighted_loss(u, t)
    with pytest.raises(ValueError, match="adaptive_weighted_loss does not support double backward"):
        torch.autograd.grad(loss, u, create_graph=True)
    loss.backward()  # an ordinary backward of the same graph still works
    assert u.grad is not None


@pytest.mark.parametrize("weights", [False, True])
def test_torch_func_transforms_and_forward_ad(backend, weights):
    """The Function has no jvp or setup_context form: under transforms the op runs its formula as
    plain torch ops, which must give .backward()'s gradient (it used to fail with torch's error)."""
    u, u_tgt = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    w = torch.rand(3) if weights else None
    check_loss_under_transforms(lambda a: adaptive_weighted_loss(a, u_tgt, w, p=0.75)[0], u)
