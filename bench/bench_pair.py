"""Host cost of the pair mechanism (``meanflow.ops.pair``), which every fused JVP op goes through
(``pytest bench/bench_pair.py --benchmark-only``).

The op is trivial on purpose (y = 2x, ẏ = 2ẋ, on an (8, 8) tensor), so each call's time is the
mechanism's: argument handling, the autograd node, the tangent bookkeeping. Each round makes 100
calls. Providers:

- ``direct``: the op's fused pass called as a plain function: no mechanism at all (the floor);
- ``pair_no_grad``: ``apply_pair`` in pair form when nothing needs a gradient (no autograd node);
- ``pair_autograd``: pair form on an input that requires grad (``EagerPairFunction``);
- ``setup_context_form``: the same through ``PairFunction.apply``, the form torch.func needs;
- ``forward_ad``: ``torch.autograd.forward_ad`` dual input, tangent unpacked and fused;
- ``func_jvp``: ``torch.func.jvp`` over the op.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from meanflow.ops.pair import PairFunction, PairOp, apply_pair

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

CALLS = 100
SHAPE = (8, 8)


def _forward(inputs, tangents, options):
    (x,), (x_dot,) = inputs, tangents
    return 2 * x, None if x_dot is None else 2 * x_dot, ()


def _backward(inputs, y, extras, options, grad_y, needs_input_grad):
    return (2 * grad_y if needs_input_grad[0] else None,)


DOUBLE = PairOp("double", _forward, _backward)


def _target(provider: str, x: torch.Tensor, x_dot: torch.Tensor):
    leaf = x.detach().requires_grad_()
    if provider == "direct":
        return lambda: DOUBLE.forward((x,), (x_dot,), ())
    if provider == "pair_no_grad":
        return lambda: apply_pair(DOUBLE, (x,), (x_dot,))
    if provider == "pair_autograd":
        return lambda: apply_pair(DOUBLE, (leaf,), (x_dot,))
    if provider == "setup_context_form":
        return lambda: PairFunction.apply(DOUBLE, (), False, 1, leaf, x_dot)

    if provider == "forward_ad":
        def forward_ad():
            with fwAD.dual_level():
                y, _ = apply_pair(DOUBLE, (fwAD.make_dual(x, x_dot),), None)
                return fwAD.unpack_dual(y).tangent
        return forward_ad
    return lambda: torch.func.jvp(lambda t: apply_pair(DOUBLE, (t,), None)[0], (x,), (x_dot,))


@pytest.mark.parametrize("provider", ["direct", "pair_no_grad", "pair_autograd", "setup_context_form",
                                      "forward_ad", "func_jvp"])
def test_call(benchmark, provider):
    x, x_dot = (torch.randn(SHAPE, device=timing.DEVICE) for _ in range(2))
    timing.run(benchmark, op="pair", case="call", provider=provider,
               shape=f"{SHAPE} float32, {CALLS} calls per round", target=_target(provider, x, x_dot),
               calls=CALLS)
