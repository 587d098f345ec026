"""torch.compile of the ops (``meanflow.ops.pair_compile``): every op in both forms compiles as
one graph (``fullgraph=True``) around its opaque custom op, and gives eager's values, tangents
and gradients on both backends; the custom ops pass torch's own checks (``opcheck``: schema,
fake implementation against the real one, autograd registration); forward AD inside a compiled
function runs eagerly behind a graph break and stays right; the losses compile as their formula.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.autograd.forward_ad as fwAD

from meanflow import ops
from meanflow.ops import pair_compile
from meanflow.ops.pair import PairOp


def _cases():
    """name: (pair form (primals, tangents) -> (y, y_dot), primals, tangents). Ragged sizes; the
    tangents are None where an op takes none (RoPE's tables, the mask)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x, mod, gate = randn(2, 5, 12), randn(2, 12), randn(2, 12)
    q, k, v = randn(1, 2, 9, 8), randn(1, 2, 11, 8), randn(1, 2, 11, 8)
    cos, sin = randn(9, 8), randn(9, 8)
    keys = torch.arange(11) < 7
    attention_tangents = [randn(*t.shape) for t in (q, k, v)]
    return {
        "linear": (lambda p, t: ops.jvp_linear_pair(p[0], t[0], p[1], p[2], t[1], t[2]),
                   [x, randn(7, 12), randn(7)], [randn(2, 5, 12), randn(7, 12), randn(7)]),
        "rms_norm": (lambda p, t: ops.jvp_rms_norm_pair(p[0], t[0], p[1], 1e-6, t[1]),
                     [x, randn(12)], [randn(2, 5, 12), randn(12)]),
        "layer_norm_modulate": (lambda p, t: ops.jvp_layer_norm_modulate_pair(p[0], t[0], p[1], t[1],
                                                                              p[2], t[2]),
                                [x, mod, randn(2, 12)], [randn(2, 5, 12), randn(2, 12), randn(2, 12)]),
        "silu": (lambda p, t: ops.jvp_silu_pair(p[0], t[0]), [x], [randn(2, 5, 12)]),
        "gelu_tanh": (lambda p, t: ops.jvp_gelu_tanh_pair(p[0], t[0]), [x], [randn(2, 5, 12)]),
        "rope": (lambda p, t: ops.jvp_rope_pair(p[0], t[0], cos, sin), [q], [randn(1, 2, 9, 8)]),
        "gated_residual": (lambda p, t: ops.jvp_gated_residual_pair(p[0], t[0], p[1], t[1], p[2], t[2]),
                           [x, gate, randn(2, 5, 12)], [randn(2, 5, 12), randn(2, 12), randn(2, 5, 12)]),
        "attention_masked": (lambda p, t: ops.jvp_attention_pair(*p, *t, attn_mask=keys),
                             [q, k, v], attention_tangents),
        "attention_causal_no_key_tangent": (
            lambda p, t: ops.jvp_attention_pair(*p, t[0], None, t[2], is_causal=True, scale=0.3),
            [q, k, v], attention_tangents),
    }


CASES = list(_cases())


def _leaves(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def _values_and_grads(pair, primals, tangents, weights):
    """y, y_dot and the gradients of a weighted sum of y to every primal."""
    leaves = _leaves(primals)
    y, y_dot = pair(leaves, tangents)
    grads = torch.autograd.grad((y * weights).sum(), leaves)
    return y, y_dot, grads


@pytest.mark.parametrize("name", CASES)
def test_the_pair_form_of_every_op_compiles_as_one_graph(backend, name):
    pair, primals, tangents = _cases()[name]
    y, y_dot = pair(primals, tangents)
    weights = torch.randn_like(y)
    expected = _values_and_grads(pair, primals, tangents, weights)
    torch._dynamo.reset()
    compiled = torch.compile(pair, backend="aot_eager", fullgraph=True)
    got = _values_and_grads(compiled, primals, tangents, weights)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for g, e in zip(got[2], expected[2]):
        torch.testing.assert_close(g, e)
    y_dot = compiled(_leaves(primals), tangents)[1]
    assert y_dot.grad_fn is None and not y_dot.requires_grad  # the tangent stays detached


def _drop_in_cases():
    gen = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x, w, proj = randn(3, 10), randn(10), randn(6, 10)
    q, k, v = randn(1, 2, 7, 8), randn(1, 2, 13, 8), randn(1, 2, 13, 8)
    return {
        "rms_norm_then_linear": (lambda a, b: ops.jvp_linear(ops.jvp_rms_norm(a, b), proj), [x, w]),
        "attention_then_silu": (lambda a, b, c: ops.jvp_silu(ops.jvp_attention(a, b, c, is_causal=True)),
                                [q, k, v]),
    }


@pytest.mark.parametrize("name", list(_drop_in_cases()))
def test_drop_in_forms_compile_with_inductor(backend, name):
    fn, primals = _drop_in_cases()[name]
    leaves = _leaves(primals)
    y = fn(*leaves)
    weights = torch.randn_like(y)
    expected = torch.autograd.grad((y * weights).sum(), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    leaves = _leaves(primals)
    got_y = compiled(*leaves)
    got = torch.autograd.grad((got_y * weights).sum(), leaves)
    torch.testing.assert_close(got_y, y)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", ["linear", "layer_norm_modulate", "attention_masked"])
def test_the_custom_ops_pass_opcheck(backend, name):
    """torch.library.opcheck: the schema, the fake implementation (the reference on fake tensors)
    against the real one, and the autograd registration, through the arguments the compiled
    route hands the custom op."""
    pair, primals, tangents = _cases()[name]
    calls = []
    real = pair_compile.pair_forward

    def spy(*args):
        calls.append(args)
        return real(*args)

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pair_compile, "pair_forward", spy)
        torch.compile(pair, backend="eager", fullgraph=True)(_leaves(primals), tangents)
    name_, options, tensors, present = calls[0]
    tensors = [t.detach().requires_grad_(i < len(primals)) for i, t in enumerate(tensors)]
    torch.library.opcheck(pair_compile.pair_forward, (name_, options, tensors, present))


def test_forward_ad_inside_a_compiled_function_runs_eagerly_and_stays_right(backend):
    """torch.func.jvp and a dual level inside torch.compile: Dynamo cannot trace forward AD
    through the Function, so the call runs eagerly (a graph break), and the Function and the
    launchers below it are not traced frame by frame (which failed inside Triton)."""
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))

    def with_func_jvp(q, k, v):
        out, out_dot = torch.func.jvp(ops.jvp_attention, (q, k, v), tangents)
        return ((out - out_dot) ** 2).sum()

    def with_dual_level(q, k, v):
        with fwAD.dual_level():
            out = ops.jvp_attention(*(fwAD.make_dual(p, t) for p, t in zip((q, k, v), tangents)))
            out, out_dot = fwAD.unpack_dual(out)
        return ((out - out_dot) ** 2).sum()

    for fn in (with_func_jvp, with_dual_level):
        leaves = _leaves((q, k, v))
        expected = fn(*leaves)
        expected_grads = torch.autograd.grad(expected, leaves)
        torch._dynamo.reset()
        leaves = _leaves((q, k, v))
        got = torch.compile(fn, backend="aot_eager")(*leaves)
        torch.testing.assert_close(got, expected)
        for g, e in zip(torch.autograd.grad(got, leaves), expected_grads):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("loss", ["adaptive_weighted", "alignment"])
def test_the_losses_compile_as_their_formula(backend, loss):
    u, a, b = torch.randn(3, 2, 11), torch.randn(3, 2, 11), torch.randn(3, 2, 11)

    def fn(x):
        if loss == "adaptive_weighted":
            return ops.adaptive_weighted_loss(x, a)[0]
        return ops.alignment_loss(x, a, b)[0]

    leaf = u.clone().requires_grad_()
    expected = fn(leaf)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    torch._dynamo.reset()
    leaf = u.clone().requires_grad_()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(leaf)
    (got_grad,) = torch.autograd.grad(got, leaf)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


def test_options_a_literal_cannot_carry_are_refused():
    with pytest.raises(ValueError, match="options"):
        pair_compile.encode_options((1.0, object()))
    assert pair_compile.decode_options(pair_compile.encode_options((True, 0.1, "triton", None))) == (
        True, 0.1, "triton", None)


def test_a_second_op_with_a_known_name_is_refused():
    with pytest.raises(ValueError, match="jvp_silu"):
        PairOp("jvp_silu", lambda *a: None, lambda *a: None)
