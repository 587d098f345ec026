"""Benchmarks of ``meanflow.ops.jvp_attention`` against its baselines (``pytest bench --benchmark-only``).

Cases (one pytest-benchmark group per case and shape, so the ratios sit side by side):

- ``fwd_jvp``: ``torch.func.jvp`` of attention (output and tangent); 12·Nq·Nk·d FLOPs per (B·H).
- ``fwd_jvp_bwd``: the MeanFlow pattern: ``out, tan = torch.func.jvp(...)``, the tangent detached
  (it feeds a stop-gradient target), then ``out.backward(tan)`` — the gradient of
  ``(out * tan.detach()).sum()``; 22·Nq·Nk·d.
- ``fwd``: the primal forward only; 4·Nq·Nk·d.
- ``bwd``: the primal backward only (the forward runs untimed in the set-up); 10·Nq·Nk·d.
- ``fwd_jvp_ragged``: ``torch.func.jvp`` over four self-attention sequences of N, 3N/4, N/2 and N/4
  tokens (B is ignored): ``ours_varlen`` packs them (``jvp_attention_varlen``), ``ours_padded``
  pads them to N and masks the padding keys ((4, 1, 1, N) key-padding mask). TFLOP/s counts the
  work the sequences need, 12·Σ nᵢ²·d per head, for both.

Providers: ``ours`` (Triton on CUDA, the plain-torch reference on CPU), ``ours_pair``
(fwd_jvp and fwd_jvp_bwd: the same kernels called in pair form, ``jvp_attention_pair``, as the
trainer's pair-mode forward calls them; beside ``ours`` it shows what ``torch.func.jvp``'s own
host work costs, which the per-call synchronisation puts in series with the kernel), ``ours_eager_rescale``
(CUDA only: ours with ``RESCALE_THRESHOLD`` < 0, the forward's rescale on every key block, for
fwd_jvp and fwd), ``math_sdpa``
(``SDPBackend.MATH``, the only SDPA backend that works under forward AD), ``flash_sdpa``
(``SDPBackend.FLASH_ATTENTION``: FlashAttention-2 inside PyTorch, CUDA only) and
``jvp_flash_attention`` (PyPI, CUDA only; ``JVPAttn.fwd_dual`` under ``torch.func.jvp``; its
kernel takes N even and >= 32 — its backward N a multiple of 32 — and head dims 16/32/64/128/256).
"""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow.ops import jvp_attention, jvp_attention_pair, jvp_attention_varlen
from meanflow.ops.dispatch import resolve_backend

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

CUDA = torch.cuda.is_available()

try:
    from jvp_flash_attention.jvp_attention import JVPAttn as _PeerAttn

    _PEER_IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - absent or broken: the rows are skipped with the reason
    _PeerAttn = None
    _PEER_IMPORT_ERROR = f"{type(exc).__name__}: {str(exc).strip()[:120]}"

PEER = "jvp_flash_attention"
EAGER = "ours_eager_rescale"
PAIR = "ours_pair"
PEER_HEAD_DIMS = (16, 32, 64, 128, 256)
PEER_MIN_BLOCK = 32  # its backward tiles N by 32

# Float32 (B, H, Nq, Nk) buffers math SDPA holds at its peak (it upcasts bf16 to float32 on
# CUDA): an estimate to skip shapes that cannot fit without trying.
MATH_NXN_BUFFERS = {"fwd": 3, "bwd": 5, "fwd_jvp": 6, "fwd_jvp_bwd": 10}
FLOP_FACTOR = {"fwd": 4, "bwd": 10, "fwd_jvp": 12, "fwd_jvp_bwd": 22}


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------

def _sdpa(backend: SDPBackend):
    def attention(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return attention


def _peer_dual(q, k, v):
    return _PeerAttn.fwd_dual(q, k, v)


@contextlib.contextmanager
def _rescale_threshold(value: float):
    kernels = importlib.import_module("meanflow.kernels.jvp_attention")
    saved, kernels.RESCALE_THRESHOLD = kernels.RESCALE_THRESHOLD, value
    try:
        yield
    finally:
        kernels.RESCALE_THRESHOLD = saved


def _ours_eager_rescale(q, k, v):
    """``ours`` with the forward rescaling its accumulators on every key block (the form before
    lazy rescaling): its A/B, timed side by side."""
    with _rescale_threshold(-1.0):
        return jvp_attention(q, k, v)


ATTENTION = {
    "ours": lambda q, k, v: jvp_attention(q, k, v),
    EAGER: _ours_eager_rescale,
    "math_sdpa": _sdpa(SDPBackend.MATH),
    "flash_sdpa": _sdpa(SDPBackend.FLASH_ATTENTION),
    PEER: _peer_dual,
}


def _check_provider(provider: str, n_ctx: int, head_dim: int, needs_backward: bool) -> None:
    """Skips rows that cannot run here, with the reason."""
    if provider in ("flash_sdpa", PEER, EAGER) and not CUDA:
        pytest.skip(f"{provider} needs CUDA")
    if provider == PEER:
        if _PeerAttn is None:
            pytest.skip(f"{PEER} not importable ({_PEER_IMPORT_ERROR})")
        if n_ctx % 2 or n_ctx < 32 or (needs_backward and n_ctx % PEER_MIN_BLOCK):
            pytest.skip(f"{PEER} does not take N={n_ctx}")
        if head_dim not in PEER_HEAD_DIMS:
            pytest.skip(f"{PEER} does not take head dim {head_dim}")


def _backend_label(provider: str, cfg) -> str:
    if provider in ("ours", EAGER, PAIR):
        return provider.replace("ours", f"ours/{resolve_backend(torch.device(cfg.device))}", 1)
    return provider


def _inputs(cfg, n_ctx: int, requires_grad: bool, seed: int = 0):
    """q, k, v, their tangents and an output gradient: (B, H, N, d), contiguous."""
    gen = torch.Generator(device=cfg.device).manual_seed(seed)
    shape = (cfg.batch, cfg.heads, n_ctx, cfg.head_dim)

    def randn():
        return torch.randn(shape, generator=gen, device=cfg.device, dtype=cfg.dtype)

    q, k, v = (randn().requires_grad_(requires_grad) for _ in range(3))
    tangents = tuple(randn() for _ in range(3))
    grad_out = randn()
    return (q, k, v), tangents, grad_out


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------

def _output_and_tangent(provider: str):
    """``(q, k, v), (q̇, k̇, v̇) -> (out, out_dot)`` for a provider: torch.func.jvp of its attention,
    or the pair form for ``ours_pair``."""
    if provider == PAIR:
        return lambda primals, tangents: jvp_attention_pair(*primals, *tangents)
    attention = ATTENTION[provider]
    return lambda primals, tangents: torch.func.jvp(attention, primals, tangents)


@pytest.mark.parametrize("provider", ["ours", PAIR, EAGER, PEER, "math_sdpa"])
def test_fwd_jvp(measure, bench_cfg, provider, n_ctx):
    _check_provider(provider, n_ctx, bench_cfg.head_dim, needs_backward=False)
    output_and_tangent = _output_and_tangent(provider)
    primals, tangents, _ = _inputs(bench_cfg, n_ctx, requires_grad=False)

    def target():
        return output_and_tangent(primals, tangents)

    measure(case="fwd_jvp", provider=provider, n_ctx=n_ctx, target=target,
            flop_factor=FLOP_FACTOR["fwd_jvp"],
            nxn_buffers=MATH_NXN_BUFFERS["fwd_jvp"] if provider == "math_sdpa" else 0,
            tolerate_errors=provider == PEER, backend=_backend_label(provider, bench_cfg))


@pytest.mark.parametrize("provider", ["ours", PAIR, PEER, "math_sdpa"])
def test_fwd_jvp_bwd(measure, bench_cfg, provider, n_ctx):
    _check_provider(provider, n_ctx, bench_cfg.head_dim, needs_backward=True)
    output_and_tangent = _output_and_tangent(provider)
    primals, tangents, _ = _inputs(bench_cfg, n_ctx, requires_grad=True)

    def setup():
        timing.clear_grads(*primals)
        return ()

    def target():
        out, tan = output_and_tangent(primals, tangents)
        tan = tan.detach()  # the stop-gradient target: drops the tangent's graph, if any
        out.backward(tan)   # = d/d(q, k, v) of (out * tan.detach()).sum()
        return None

    measure(case="fwd_jvp_bwd", provider=provider, n_ctx=n_ctx, target=target, setup=setup,
            flop_factor=FLOP_FACTOR["fwd_jvp_bwd"],
            nxn_buffers=MATH_NXN_BUFFERS["fwd_jvp_bwd"] if provider == "math_sdpa" else 0,
            tolerate_errors=provider == PEER, backend=_backend_label(provider, bench_cfg))


@pytest.mark.parametrize("provider", ["ours", EAGER, "flash_sdpa", "math_sdpa"])
def test_fwd(measure, bench_cfg, provider, n_ctx):
    _check_provider(provider, n_ctx, bench_cfg.head_dim, needs_backward=False)
    attention = ATTENTION[provider]
    (q, k, v), _, _ = _inputs(bench_cfg, n_ctx, requires_grad=False)

    def target():
        return attention(q, k, v)

    measure(case="fwd", provider=provider, n_ctx=n_ctx, target=target,
            flop_factor=FLOP_FACTOR["fwd"],
            nxn_buffers=MATH_NXN_BUFFERS["fwd"] if provider == "math_sdpa" else 0,
            backend=_backend_label(provider, bench_cfg))


@pytest.mark.parametrize("provider", ["ours", "flash_sdpa", "math_sdpa"])
def test_bwd(measure, bench_cfg, provider, n_ctx):
    _check_provider(provider, n_ctx, bench_cfg.head_dim, needs_backward=True)
    attention = ATTENTION[provider]
    primals, _, grad_out = _inputs(bench_cfg, n_ctx, requires_grad=True)

    def setup():  # untimed: the forward that the timed backward consumes
        timing.clear_grads(*primals)
        return (attention(*primals),)

    def target(out):
        out.backward(grad_out)
        return None

    measure(case="bwd", provider=provider, n_ctx=n_ctx, target=target, setup=setup,
            flop_factor=FLOP_FACTOR["bwd"],
            nxn_buffers=MATH_NXN_BUFFERS["bwd"] if provider == "math_sdpa" else 0,
            backend=_backend_label(provider, bench_cfg))


def _ragged_lengths(n_ctx: int) -> list[int]:
    return [n_ctx, 3 * n_ctx // 4, n_ctx // 2, n_ctx // 4]


@pytest.mark.parametrize("provider", ["ours_varlen", "ours_padded"])
def test_fwd_jvp_ragged(measure, bench_cfg, provider, n_ctx):
    lengths = _ragged_lengths(n_ctx)
    gen = torch.Generator(device=bench_cfg.device).manual_seed(0)
    h, d = bench_cfg.heads, bench_cfg.head_dim

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=bench_cfg.device, dtype=bench_cfg.dtype)

    if provider == "ours_varlen":
        primals = tuple(randn(sum(lengths), h, d) for _ in range(3))
        # On the CPU, as a caller that knows its lengths gives them: checked without a device sync.
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

        def attention(q, k, v):
            return jvp_attention_varlen(q, k, v, cu, cu, max_seqlen_q=n_ctx, max_seqlen_k=n_ctx)
    else:
        primals = tuple(randn(len(lengths), h, n_ctx, d) for _ in range(3))
        mask = (torch.arange(n_ctx)[None, :] < torch.tensor(lengths)[:, None]).to(bench_cfg.device)[:, None, None]

        def attention(q, k, v):
            return jvp_attention(q, k, v, attn_mask=mask)
    tangents = tuple(torch.randn_like(t) for t in primals)

    def target():
        return torch.func.jvp(attention, primals, tangents)

    measure(case="fwd_jvp_ragged", provider=provider, n_ctx=n_ctx, target=target,
            flop_factor=FLOP_FACTOR["fwd_jvp"], attended_pairs=sum(n * n for n in lengths),
            backend=provider.replace("ours", f"ours/{resolve_backend(torch.device(bench_cfg.device))}", 1))
