"""The pair mechanism on its own (``meanflow.ops.pair``), with a toy op y = x·w, ẏ = ẋ·w + x·ẇ.

Every route through ``apply_pair`` (pair form with and without autograd, forward AD, torch.func
transforms) must give the same values, tangents and gradients; which Function form each route
takes is checked too, since the cheap forms are only valid where they are used.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from meanflow.ops.pair import EagerPairFunction, PairFunction, PairOp, apply_pair

FORWARD_CALLS: list[tuple] = []


def _forward(inputs, tangents, options):
    (x, w), (x_dot, w_dot) = inputs, tangents
    FORWARD_CALLS.append(tuple(t is not None for t in tangents))
    y_dot = None
    if x_dot is not None:
        y_dot = x_dot * w
    if w_dot is not None:
        y_dot = x * w_dot if y_dot is None else y_dot + x * w_dot
    return x * w, y_dot, ()


def _backward(inputs, y, extras, options, grad_y, needs_input_grad):
    x, w = inputs
    return (grad_y * w if needs_input_grad[0] else None,
            (grad_y * x).sum(0) if needs_input_grad[1] else None)


SCALE = PairOp("scale", _forward, _backward)


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x, x_dot = (torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    w, w_dot = (torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(2))
    return x, x_dot, w, w_dot


def _backward_name(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__


def test_pair_form_with_autograd_takes_the_eager_function(data):
    x, x_dot, w, w_dot = data
    x = x.requires_grad_()
    y, y_dot = apply_pair(SCALE, (x, w), (x_dot, w_dot))
    assert _backward_name(y) == "EagerPairFunctionBackward"
    assert y_dot.grad_fn is None and not y_dot.requires_grad
    torch.testing.assert_close(y, x * w)
    torch.testing.assert_close(y_dot, x_dot * w + x * w_dot)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad * w)


def test_pair_form_without_autograd_records_nothing(data):
    x, x_dot, w, w_dot = data
    y, y_dot = apply_pair(SCALE, (x, w), (x_dot, None))
    assert y.grad_fn is None and y_dot.grad_fn is None
    torch.testing.assert_close(y_dot, x_dot * w)
    with torch.no_grad():  # an input that requires grad, but grad mode off
        y, _ = apply_pair(SCALE, (x.requires_grad_(), w), (x_dot, None))
    assert y.grad_fn is None and not y.requires_grad


def test_zero_and_absent_tangents_cost_no_work(data):
    x, x_dot, w, _ = data
    FORWARD_CALLS.clear()
    _, y_dot = apply_pair(SCALE, (x, w), (torch._efficientzerotensor(x.shape, dtype=x.dtype), None))
    assert FORWARD_CALLS == [(False, False)] and y_dot is None


def test_forward_ad_outside_torch_func(data):
    x, x_dot, w, w_dot = data
    x = x.requires_grad_()
    with fwAD.dual_level():
        y, _ = apply_pair(SCALE, (fwAD.make_dual(x, x_dot), fwAD.make_dual(w, w_dot)), None)
        primal, tangent = fwAD.unpack_dual(y)
    assert _backward_name(y) == "EagerPairFunctionBackward"
    torch.testing.assert_close(tangent, x_dot * w + x * w_dot)
    assert tangent.grad_fn is None
    primal.sum().backward()
    torch.testing.assert_close(x.grad, w.expand_as(x))


def test_torch_func_jvp_and_grad_take_the_setup_context_form(data, monkeypatch):
    x, x_dot, w, w_dot = data
    used = []
    for function in (PairFunction, EagerPairFunction):
        original = function.apply.__func__
        monkeypatch.setattr(function, "apply", classmethod(
            lambda cls, *args, _original=original: used.append(cls.__name__) or _original(cls, *args)))

    y, y_dot = torch.func.jvp(lambda x, w: apply_pair(SCALE, (x, w), None)[0], (x, w), (x_dot, w_dot))
    torch.testing.assert_close(y_dot, x_dot * w + x * w_dot)
    grad = torch.func.grad(lambda x: apply_pair(SCALE, (x, w), None)[0].sum())(x)
    torch.testing.assert_close(grad, w.expand_as(x))
    assert set(used) == {"PairFunction"}  # functorch re-enters apply once per transform level

    used.clear()
    apply_pair(SCALE, (x.requires_grad_(), w), (x_dot, None))
    assert used == ["EagerPairFunction"]


def test_routes_agree_on_gradients(data):
    """Pair form (eager Function) and torch.func.vjp (setup_context form) give the same grads."""
    x, x_dot, w, w_dot = data
    grad = torch.randn_like(x)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y, _ = apply_pair(SCALE, (x1, w1), (x_dot, w_dot))
    y.backward(grad)
    _, vjp = torch.func.vjp(lambda x, w: apply_pair(SCALE, (x, w), None)[0], x, w)
    gx, gw = vjp(grad)
    torch.testing.assert_close(x1.grad, gx)
    torch.testing.assert_close(w1.grad, gw)
