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

``test_triton_route`` times the host side of each fused op's Triton route in pair form, with
its kernel launch replaced by a no-op (so it runs on a CPU too): validation, the pair mechanism,
dispatch, output allocation, the launcher's arithmetic. Set beside an op's wall time and its
``device_ms`` on a GPU, it tells how much of a call is Triton's own launch.
``test_attention_route`` does the same for ``jvp_attention``: the pair form with and without its
backward, and ``torch.func.jvp`` over the drop-in. ``test_loss_route`` does the same for the two
losses, forward and backward (their kernels stubbed), beside the eager formula of
``bench/bench_<loss>.py`` on the same inputs (whose kernels are not stubbed).
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from meanflow.ops.pair import PairFunction, PairOp, apply_pair

import meanflow.ops as ops

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


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


# op -> (kernel module, kernel name, call on (B, N, C) = (1, 64, 96) and per-head (1, 64, 4, 32) inputs)
TRITON_ROUTES = {
    "gelu_tanh": ("jvp_activation", "_jvp_activation_kernel", lambda x, h, w, c, cos, sin:
                  ops.jvp_gelu_tanh_pair(x, x)),
    "rms_norm": ("jvp_rms_norm", "_jvp_rms_norm_kernel", lambda x, h, w, c, cos, sin:
                 ops.jvp_rms_norm_pair(h, h, w, 1e-6)),
    "layer_norm_modulate": ("jvp_layer_norm_modulate", "_jvp_layer_norm_modulate_kernel",
                            lambda x, h, w, c, cos, sin: ops.jvp_layer_norm_modulate_pair(x, x, c, c, c, c, eps=1e-6)),
    "gated_residual": ("jvp_gated_residual", "_jvp_gated_residual_fwd_kernel", lambda x, h, w, c, cos, sin:
                       ops.jvp_gated_residual_pair(x, x, c, c, x, x)),
    "rope": ("jvp_rope", "_jvp_rope_kernel", lambda x, h, w, c, cos, sin:
             ops.jvp_rope_pair(h.transpose(1, 2), h.transpose(1, 2), cos, sin)),
}


@pytest.mark.parametrize("op", list(TRITON_ROUTES))
def test_triton_route(benchmark, monkeypatch, op):
    import importlib

    module, kernel, call = TRITON_ROUTES[op]
    monkeypatch.setattr(importlib.import_module(f"meanflow.kernels.{module}"), kernel, _NoLaunch())
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    if not timing.CUDA:  # lets the dispatch pick Triton for CPU tensors (the launches are stubbed)
        monkeypatch.setattr("meanflow.ops.dispatch.triton_interpreting", lambda: True)
    gen = torch.Generator(device=timing.DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=timing.DEVICE)

    args = (randn(1, 64, 96), randn(1, 64, 4, 32), randn(32), randn(1, 96), randn(64, 32), randn(64, 32))
    timing.run(benchmark, op=op, case="host, launch stubbed", provider="ours/triton",
               shape="(1, 64, 96) / (1, 64, 4, 32) float32, 100 calls per round",
               target=lambda: call(*args), calls=CALLS)


ATTENTION_KERNELS = ("_jvp_attention_fwd_kernel", "_jvp_attention_bwd_dq_kernel",
                     "_jvp_attention_bwd_dkdv_kernel")


def _attention_target(case: str, q, k, v, tangents):
    """One call of ``case`` on (q, k, v) leaves and their tangents: the pair form's forward + JVP
    (pair), with the backward through the output (pair + backward), or ``torch.func.jvp`` over
    the drop-in (func.jvp)."""
    if case == "pair":
        return lambda: ops.jvp_attention_pair(q, k, v, *tangents)
    if case == "func.jvp":
        return lambda: torch.func.jvp(ops.jvp_attention, (q, k, v), tangents)

    def pair_backward():
        for t in (q, k, v):
            t.grad = None
        out, _ = ops.jvp_attention_pair(q, k, v, *tangents)
        out.backward(out)
    return pair_backward


@pytest.mark.parametrize("case", ["pair", "pair + backward", "func.jvp"])
def test_attention_route(benchmark, monkeypatch, case):
    """The host side of ``jvp_attention`` on its Triton route, its three kernels stubbed:
    validation, the pair mechanism, dispatch, allocation and the launchers' arithmetic (the
    backward's included), on (1, 4, 64, 32) float32 q, k, v that require grad."""
    import importlib

    module = importlib.import_module("meanflow.kernels.jvp_attention")
    for kernel in ATTENTION_KERNELS:
        monkeypatch.setattr(module, kernel, _NoLaunch())
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    if not timing.CUDA:
        monkeypatch.setattr("meanflow.ops.dispatch.triton_interpreting", lambda: True)
    gen = torch.Generator(device=timing.DEVICE).manual_seed(0)
    q, k, v, *tangents = (torch.randn((1, 4, 64, 32), generator=gen, device=timing.DEVICE) for _ in range(6))
    for t in (q, k, v):
        t.requires_grad_()
    timing.run(benchmark, op="jvp_attention", case=f"host, {case}, launches stubbed", provider="ours/triton",
               shape="(1, 4, 64, 32) float32, 100 calls per round",
               target=_attention_target(case, q, k, v, tuple(tangents)), calls=CALLS)


# loss -> (the kernels to stub as (module, name), the loss of (u, a, b) (B, N, C) = (4, 64, 96) inputs)
LOSS_ROUTES = {
    "adaptive_weighted_loss": ((("adaptive_weighted_loss", "_adaptive_weighted_loss_fwd_kernel"),
                                ("per_sample_scale", "_per_sample_scale_kernel")),
                               lambda u, a, b: ops.adaptive_weighted_loss(u, a)[0]),
    "alignment_loss": ((("alignment_loss", "_alignment_loss_fwd_kernel"),
                        ("per_sample_scale", "_per_sample_scale_kernel")),
                       lambda u, a, b: ops.alignment_loss(u, a, b)[0]),
}


@pytest.mark.parametrize("provider", ["ours/triton", "eager"])
@pytest.mark.parametrize("loss", list(LOSS_ROUTES))
def test_loss_route(benchmark, monkeypatch, loss, provider):
    import importlib

    kernels, call = LOSS_ROUTES[loss]
    if provider == "eager":
        formula = importlib.import_module(f"bench_{loss}").formula
        n_args = formula.__code__.co_argcount
        call = lambda u, a, b: formula(*(u, a, b)[:n_args])  # noqa: E731
    else:
        for module, kernel in kernels:
            monkeypatch.setattr(importlib.import_module(f"meanflow.kernels.{module}"), kernel, _NoLaunch())
        monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
        if not timing.CUDA:
            monkeypatch.setattr("meanflow.ops.dispatch.triton_interpreting", lambda: True)
    gen = torch.Generator(device=timing.DEVICE).manual_seed(0)
    u, a, b = (torch.randn((4, 64, 96), generator=gen, device=timing.DEVICE) for _ in range(3))
    u.requires_grad_()

    def target():
        u.grad = None
        call(u, a, b).backward()

    timing.run(benchmark, op=loss, case="host, fwd + bwd, launches stubbed", provider=provider,
               shape="(4, 64, 96) float32, 100 calls per round", target=target, calls=CALLS)


@pytest.mark.parametrize("provider", ["plain", "in JVPAttentionMode"])
def test_attention_mode_cost(benchmark, provider):
    """What ``JVPAttentionMode`` adds to the torch calls it does not route: a small MLP (eight
    elementwise and matmul calls, no attention) with the mode off and on, (64, 64) float32."""
    import contextlib

    gen = torch.Generator(device=timing.DEVICE).manual_seed(0)
    x, w = (torch.randn((64, 64), generator=gen, device=timing.DEVICE) for _ in range(2))

    def mlp():
        h = torch.relu(x @ w + 1.0)
        return torch.tanh(h @ w.t() * 0.5 - x).sum()

    def target():
        with (ops.JVPAttentionMode() if provider != "plain" else contextlib.nullcontext()):
            return mlp()

    timing.run(benchmark, op="JVPAttentionMode", case="an MLP of 8 torch calls", provider=provider,
               shape="(64, 64) float32, 100 calls per round", target=target, calls=CALLS)
