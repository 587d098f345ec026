"""The pair mechanism on its own (``meanflow.ops.pair``), with a toy op y = x·w, ẏ = ẋ·w + x·ẇ.

Every route through ``apply_pair`` (pair form with and without autograd, forward AD, torch.func
transforms) must give the same values, tangents and gradients; which Function form each route
takes is checked too, since the cheap forms are only valid where they are used. A kernel-like toy
op (its pass reads plain memory) checks what a Triton kernel needs; the last tests run
torch.func.vjp over every real op on the Triton backend, the mechanism's backward being shared.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from meanflow import ops
from meanflow.ops.pair import EagerPairFunction, PairFunction, PairOp, apply_pair, functorch_wrapped

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


# --------------------------------------------------------------------------------------------
# A kernel-like op: its fused pass reads plain memory (the primals of dual inputs, never their
# tangents) and, with raw_tensors, cannot take torch.func's wrapped tensors.
# --------------------------------------------------------------------------------------------

def _kernel_forward(inputs, tangents, options):
    if functorch_wrapped(*inputs, *tangents):  # as a Triton launch fails on them
        raise RuntimeError("the kernel was handed a torch.func wrapper")
    plain = tuple(None if t is None else fwAD.unpack_dual(t).primal for t in (*inputs, *tangents))
    return _forward(plain[:2], plain[2:], options)


KERNEL = PairOp("kernel", _kernel_forward, _backward, raw_tensors=lambda options: True,
                input_names=("x", "w"))


@pytest.mark.parametrize("grad_mode", [True, False])
def test_pair_form_on_dual_inputs_gives_y_its_forward_ad_tangent(data, grad_mode):
    """Forward AD around a pair-form call on inputs that need no gradient: the shortcut that
    skips the autograd node would drop y's tangent, so dual inputs take the Function."""
    x, x_dot, w, w_dot = data
    t = torch.randn_like(x)
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        y, y_dot = apply_pair(KERNEL, (fwAD.make_dual(x, t), w), (x_dot, None))
        tangent = fwAD.unpack_dual(y).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, t * w)
    torch.testing.assert_close(y_dot, x_dot * w)


def test_pair_form_inside_func_jvp_gives_y_its_tangent(data):
    """torch.func.jvp around a pair-form call: y's tangent (a second fused pass over the unpacked
    outer tangents, plain tensors) and the given tangent's y_dot; y_dot itself is detached, so
    its own tangent is zero. The kernel never sees a torch.func wrapper."""
    x, x_dot, w, w_dot = data
    t, t_w = torch.randn_like(x), torch.randn_like(w)
    (y, y_dot), (y_tangent, y_dot_tangent) = torch.func.jvp(
        lambda x, w: apply_pair(KERNEL, (x, w), (x_dot, w_dot)), (x, w), (t, t_w))
    torch.testing.assert_close(y, x * w)
    torch.testing.assert_close(y_dot, x_dot * w + x * w_dot)
    torch.testing.assert_close(y_tangent, t * w + x * t_w)
    assert not y_dot_tangent.any()


@pytest.mark.parametrize("route", ["no_autograd", "autograd", "forward_ad", "func_jvp"])
def test_tangents_that_require_grad_give_a_detached_tangent(data, route):
    """Gradients never flow through the tangent, also where the given tangent has autograd
    history (forward-AD tangents after a trainable layer do): every route detaches it alike."""
    x, x_dot, w, _ = data
    x_dot = x_dot * torch.tensor(2.0, dtype=x.dtype, requires_grad=True)
    if route in ("no_autograd", "autograd"):
        _, y_dot = apply_pair(SCALE, (x.requires_grad_(route == "autograd"), w), (x_dot, None))
    elif route == "forward_ad":
        with fwAD.dual_level():
            y_dot = fwAD.unpack_dual(apply_pair(SCALE, (fwAD.make_dual(x, x_dot), w), None)[0]).tangent
    else:
        _, y_dot = torch.func.jvp(lambda x: apply_pair(SCALE, (x, w), None)[0], (x,), (x_dot,))
    torch.testing.assert_close(y_dot, x_dot.detach() * w)
    assert y_dot.grad_fn is None and not y_dot.requires_grad


def test_forward_ad_tangent_of_another_dtype_is_refused(data):
    x, x_dot, w, _ = data
    with fwAD.dual_level():
        with pytest.raises(ValueError, match="forward-AD tangent of kernel's w must have the dtype"):
            apply_pair(KERNEL, (x, fwAD.make_dual(w, w.float())), None)
    with pytest.raises(ValueError, match="forward-AD tangent of kernel's x must have the dtype"):
        torch.func.jvp(lambda x: apply_pair(KERNEL, (x, w), None)[0], (x,), (x_dot.float(),))


def test_pair_form_needs_one_tangent_per_input(data):
    x, x_dot, w, _ = data
    with pytest.raises(ValueError, match="one tangent \\(or None\\) per input: 2 inputs, got 1"):
        apply_pair(SCALE, (x, w), (x_dot,))


def test_func_vjp_over_a_raw_tensor_backward_is_refused(data):
    """torch.func.vjp hands the backward a plain cotangent and wrapped saved inputs: the saved
    tensors are checked too, so the kernel never receives a wrapper."""
    x, _, w, _ = data
    _, vjp = torch.func.vjp(lambda x: apply_pair(KERNEL, (x, w), None)[0], x)
    with pytest.raises(ValueError, match="torch.func.grad / vjp over kernel's Triton kernels is not supported"):
        vjp(torch.ones_like(x))


# --------------------------------------------------------------------------------------------
# torch.func.vjp over every op on the Triton backend: the wrapped tensors go to the op's
# plain-torch reference (PairOp.reference), so each gives the gradient .backward() gives.
# torch.func.jvp around torch.func.grad (forward over reverse, a Hessian-vector product): the
# same route for the recomputed tangent, so it is right, except through attention, whose
# backward reads the saved log-sum-exp without a tangent: refused.
# --------------------------------------------------------------------------------------------

def _op_cases(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)  # the same values in every dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x, sc = randn(2, 3, 8), randn(2, 8)
    q, table = randn(1, 2, 3, 8), randn(3, 8)
    weight, norm_weight = randn(4, 8), randn(8)
    return {  # name: (function of one tensor, its input)
        "linear": (lambda a: ops.jvp_linear(a, weight), x),
        "rms_norm": (lambda a: ops.jvp_rms_norm(a, norm_weight), x),
        "layer_norm_modulate": (lambda a: ops.jvp_layer_norm_modulate(a, sc, sc), x),
        "silu": (ops.jvp_silu, x),
        "gelu_tanh": (ops.jvp_gelu_tanh, x),
        "rope": (lambda a: ops.jvp_rope(a, table, table), q),
        "gated_residual": (lambda a: ops.jvp_gated_residual(a, sc, a), x),
        "attention": (lambda a: ops.jvp_attention(a, a * 0.5, a), q),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_func_vjp_of_every_op_on_the_triton_backend(monkeypatch, name):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    fn, inp = _op_cases()[name]
    out, vjp = torch.func.vjp(fn, inp)
    cotangent = torch.randn_like(out)
    (grad,) = vjp(cotangent)
    leaf = inp.clone().requires_grad_()
    fn(leaf).backward(cotangent)
    torch.testing.assert_close(grad, leaf.grad)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("name", list(_op_cases()))
def test_forward_over_reverse_of_every_op(monkeypatch, name, backend_name):
    """The Hessian-vector product of a cubic loss of each op, against a central difference of
    its gradient in float64 (reference backend). The op's tangent is recomputed in the Function's
    jvp there (the outer jvp's tangents are invisible to apply_pair)."""
    fn, inp = _op_cases()[name]
    direction = torch.randn_like(inp)

    def hvp():
        return torch.func.jvp(torch.func.grad(lambda a: fn(a).pow(3).sum()), (inp,), (direction,))[1]

    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    if name == "attention":
        with pytest.raises(ValueError, match="differentiating jvp_attention's backward .* is not supported"):
            hvp()
        return
    got = hvp()
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    fn64, inp64 = _op_cases(torch.float64)[name]

    def grad_at(step):
        a = (inp64 + step * direction.double()).requires_grad_()
        return torch.autograd.grad(fn64(a).pow(3).sum(), a)[0]

    step = 1e-5
    expected = (grad_at(step) - grad_at(-step)) / (2 * step)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("name", list(_op_cases()))
def test_vmap_jacrev_and_jacfwd_of_every_op(monkeypatch, name, backend_name):
    """torch.func.vmap (PairFunction.vmap: a fused call per slice) equals a loop over the batch,
    also over a middle dimension; jacrev (vmap over the backward) equals jacfwd (vmap over the
    forward-AD tangent), two routes that share nothing but the op's formula."""
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    fn, inp = _op_cases()[name]
    stacked = torch.stack([inp, 0.5 * inp, -inp])
    torch.testing.assert_close(torch.func.vmap(fn)(stacked), torch.stack([fn(x) for x in stacked]))
    torch.testing.assert_close(torch.func.vmap(fn, in_dims=1, out_dims=1)(stacked.movedim(0, 1)),
                               torch.stack([fn(x) for x in stacked], 1))
    head = inp.flatten()[:5]

    def outputs(a):  # a few outputs of the op as a function of a few input elements
        return fn(torch.cat([a, inp.flatten()[5:]]).reshape(inp.shape)).pow(2).flatten()[:4]

    torch.testing.assert_close(torch.func.jacrev(outputs)(head), torch.func.jacfwd(outputs)(head),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("name", list(_op_cases()))
def test_second_derivatives_of_every_op(monkeypatch, name, backend_name):
    """Reverse over reverse (jacrev of jacrev) equals forward over reverse (jacfwd of jacrev), and a
    backward inside a dual level carries the Hessian-vector product. Through attention, whose
    backward has no graph and reads the lse without a tangent, each of these is refused (they
    used to give zeros or a wrong product)."""
    monkeypatch.setenv("MEANFLOW_BACKEND", backend_name)
    fn, inp = _op_cases()[name]
    head = inp.flatten()[:4]

    def loss(a):
        return fn(torch.cat([a, inp.flatten()[4:]]).reshape(inp.shape)).pow(3).sum()

    direction = torch.randn_like(head)
    routes = {
        "reverse_over_reverse": lambda: torch.func.jacrev(torch.func.jacrev(loss))(head),
        "forward_over_reverse": lambda: torch.func.jacfwd(torch.func.jacrev(loss))(head),
    }

    def in_dual_level(eager):
        with fwAD.dual_level():
            a = fwAD.make_dual(head.clone().requires_grad_(eager), direction)
            g = torch.autograd.grad(loss(a), a)[0] if eager else torch.func.grad(loss)(a)
            return fwAD.unpack_dual(g).tangent

    if name == "attention":
        for route in (*routes.values(), lambda: in_dual_level(False), lambda: in_dual_level(True)):
            with pytest.raises(ValueError, match="jvp_attention's backward"):
                route()
        return
    hessian = routes["forward_over_reverse"]()
    torch.testing.assert_close(routes["reverse_over_reverse"](), hessian, rtol=1e-4, atol=1e-4)
    for eager in (False, True):  # the Triton backward used to drop the tangent (None) in a dual level
        torch.testing.assert_close(in_dual_level(eager), hessian @ direction, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(_op_cases()))
def test_forward_ad_around_vmap_of_every_op(monkeypatch, backend, name):
    """torch.func.jvp around torch.func.vmap, and vmap over dual inputs: the batched tensors are not
    unpacked (that has no batching rule), the Function's jvp recomputes the tangent."""
    fn, inp = _op_cases()[name]
    stacked, direction = torch.stack([inp, -0.5 * inp]), torch.randn(2, *inp.shape)
    expected = torch.stack([torch.func.jvp(fn, (x,), (d,))[1] for x, d in zip(stacked, direction)])
    torch.testing.assert_close(torch.func.jvp(torch.func.vmap(fn), (stacked,), (direction,))[1], expected)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(torch.func.vmap(fn)(fwAD.make_dual(stacked, direction))).tangent
    torch.testing.assert_close(tangent, expected)


def test_vmap_over_an_empty_batch(backend):
    x, weight = torch.randn(0, 3, 8), torch.randn(8)
    assert torch.func.vmap(ops.jvp_silu)(x).shape == (0, 3, 8)
    y, y_dot = torch.func.vmap(lambda a: ops.jvp_rms_norm_pair(a, a, weight))(x)
    assert y.shape == y_dot.shape == (0, 3, 8)


def test_vmap_of_a_pair_form(monkeypatch, backend):
    x, x_dot, weight = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(8)
    y, y_dot = torch.func.vmap(lambda a, d: ops.jvp_rms_norm_pair(a, d, weight))(x, x_dot)
    expected = [ops.jvp_rms_norm_pair(a, d, weight) for a, d in zip(x, x_dot)]
    torch.testing.assert_close(y, torch.stack([e[0] for e in expected]))
    torch.testing.assert_close(y_dot, torch.stack([e[1] for e in expected]))


def test_forward_over_reverse_without_a_reference_is_refused(data):
    """A kernel-only op (no plain-torch reference) cannot take the wrapped tangents of a
    torch.func.jvp around torch.func.grad: refused by name, not handed to the kernel."""
    x, x_dot, w, _ = data
    with pytest.raises(ValueError, match="torch.func.jvp around torch.func.grad / vjp over kernel's Triton kernels"):
        torch.func.jvp(torch.func.grad(lambda a: apply_pair(KERNEL, (a, w), None)[0].sum()), (x,), (x_dot,))


# --------------------------------------------------------------------------------------------
# torch.func.jvp around the pair form of every op on the Triton backend: y's tangent equals the
# drop-in form's under torch.func.jvp, y_dot equals the pair form's outside (the kernels get
# plain tensors; they used to be handed torch.func wrappers and fail).
# --------------------------------------------------------------------------------------------

def _pair_cases():
    x, sc, sh = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8)
    q, table = torch.randn(1, 2, 5, 8), torch.randn(5, 8)
    weight, norm_weight = torch.randn(4, 8), torch.randn(8)
    inner = torch.randn(2, 5, 8)
    inner_q = torch.randn(1, 2, 5, 8)
    return {  # name: (pair form of one tensor and its inner tangent, drop-in form, input, inner tangent)
        "linear": (lambda a, d: ops.jvp_linear_pair(a, d, weight), lambda a: ops.jvp_linear(a, weight), x, inner),
        "rms_norm": (lambda a, d: ops.jvp_rms_norm_pair(a, d, norm_weight), lambda a: ops.jvp_rms_norm(a, norm_weight),
                     x, inner),
        "layer_norm_modulate": (lambda a, d: ops.jvp_layer_norm_modulate_pair(a, d, sc, None, sh, None),
                                lambda a: ops.jvp_layer_norm_modulate(a, sc, sh), x, inner),
        "silu": (ops.jvp_silu_pair, ops.jvp_silu, x, inner),
        "gelu_tanh": (ops.jvp_gelu_tanh_pair, ops.jvp_gelu_tanh, x, inner),
        "rope": (lambda a, d: ops.jvp_rope_pair(a, d, table, table), lambda a: ops.jvp_rope(a, table, table),
                 q, inner_q),
        "gated_residual": (lambda a, d: ops.jvp_gated_residual_pair(a, d, sc, None, a, d),
                           lambda a: ops.jvp_gated_residual(a, sc, a), x, inner),
        "attention": (lambda a, d: ops.jvp_attention_pair(a, a * 0.5, a, d, d * 0.5, d),
                      lambda a: ops.jvp_attention(a, a * 0.5, a), q, inner_q),
    }


@pytest.mark.parametrize("route", ["func_jvp", "dual_level"])
@pytest.mark.parametrize("name", list(_pair_cases()))
def test_forward_ad_around_the_pair_form_of_every_op_on_the_triton_backend(monkeypatch, name, route):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    pair, drop_in, inp, inner = _pair_cases()[name]
    # An outer tangent without unit last stride: the op's prepare gives the kernels their layout.
    outer = torch.randn(inp.shape[::-1]).permute(*reversed(range(inp.dim())))
    if route == "func_jvp":
        (y, y_dot), (y_tangent, y_dot_tangent) = torch.func.jvp(lambda a: pair(a, inner), (inp,), (outer,))
    else:
        with fwAD.dual_level():
            y, y_dot = pair(fwAD.make_dual(inp, outer), inner)
            y, y_tangent = fwAD.unpack_dual(y)
            y_dot_tangent = fwAD.unpack_dual(y_dot).tangent
    expected_y, expected_tangent = torch.func.jvp(drop_in, (inp,), (outer.contiguous(),))
    expected_y_dot = pair(inp, inner)[1]
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(y_tangent, expected_tangent)
    torch.testing.assert_close(y_dot, expected_y_dot)
    assert y_dot_tangent is None or not y_dot_tangent.any()  # y_dot is detached: no tangent of its own


def test_grad_around_jvp_warns_that_the_tangent_carries_no_gradient(data):
    """torch.func.grad over a function of the tangent would miss the op's part of the gradient
    (the tangent is computed outside autograd): said with a warning, in both forms."""
    x, x_dot, w, _ = data

    def of_tangent(w, form):
        def y(a):
            return apply_pair(SCALE, (a, w), None)[0] if form == "drop_in" else apply_pair(SCALE, (a, w), (x_dot, None))
        _, tangent = torch.func.jvp(y, (x,), (x_dot,))
        return (tangent[0] if form == "pair" else tangent).sum()

    for form in ("drop_in", "pair"):
        with pytest.warns(UserWarning, match="carries no gradient"):
            grad = torch.func.grad(of_tangent)(w, form)
        assert not grad.any()  # what the warning says: the op's part is missing
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        torch.func.jvp(lambda a: apply_pair(SCALE, (a, w), None)[0], (x,), (x_dot,))   # no grad around: silent
        torch.func.jvp(lambda a: torch.func.grad(lambda b: apply_pair(SCALE, (b, w), None)[0].sum())(a),
                       (x,), (x_dot,))   # forward over reverse: silent
