"""The ``meanflow`` command.

    meanflow            # = meanflow demo
    meanflow demo       # jvp_attention under torch.func.jvp against math SDPA, on this machine

``demo`` runs the MeanFlow pattern (output and tangent in one pass, then a backward through
the output) at a small size on the backend ``MEANFLOW_BACKEND`` selects, checks it against
PyTorch's math SDPA in float64, and prints the errors and the time of both.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _meanflow_step(attention, q, k, v, tangents):
    """out, tan = jvp(attention); loss = ‖out − sg(tan)‖²; backward. Returns (out, tan, grads)."""
    primals = tuple(t.detach().requires_grad_() for t in (q, k, v))
    out, tan = torch.func.jvp(attention, primals, tangents)
    ((out - tan.detach()) ** 2).mean().backward()
    return out, tan, [p.grad for p in primals]


def demo(args: argparse.Namespace) -> int:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from meanflow.ops import jvp_attention
    from meanflow.ops.dispatch import resolve_backend
    from meanflow.testing import relative_error

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    shape_q = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape_q, device=device, dtype=dtype) for _ in range(3))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    backend = resolve_backend(device)
    print(f"jvp_attention demo: B={args.batch} H={args.heads} N={args.tokens} d={args.head_dim} "
          f"{str(dtype).removeprefix('torch.')} on {device.type}, backend {backend}")

    def math_sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    def timed(fn, *inputs):
        fn(*inputs)  # warm-up (compilation, autotuning)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    ours, ours_s = timed(lambda *x: _meanflow_step(jvp_attention, *x), q, k, v, tangents)
    math, math_s = timed(lambda *x: _meanflow_step(math_sdpa, *x), q, k, v, tangents)
    oracle = _meanflow_step(math_sdpa, q.double(), k.double(), v.double(), tuple(t.double() for t in tangents))
    names = ("output", "tangent", "grad q", "grad k", "grad v")
    worst = 0.0
    for name, a, b in zip(names, (ours[0], ours[1], *ours[2]), (oracle[0], oracle[1], *oracle[2])):
        err = relative_error(a, b)
        worst = max(worst, err)
        print(f"  {name:8s} relative error vs float64 math SDPA: {err:.2e}")
    print(f"  tangent has grad_fn: {ours[1].grad_fn is not None} (math SDPA's: {math[1].grad_fn is not None})")
    print(f"  MeanFlow step (jvp + backward): jvp_attention {ours_s * 1e3:.1f} ms, "
          f"math SDPA {math_s * 1e3:.1f} ms")
    limit = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = worst <= limit
    print("OK" if ok else f"FAILED: error {worst:.2e} > {limit:.0e}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meanflow", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    demo_parser = commands.add_parser("demo", help="jvp_attention under torch.func.jvp vs math SDPA")
    for name, default in (("batch", 1), ("heads", 4), ("tokens", 1024), ("head-dim", 64), ("seed", 0)):
        demo_parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    try:
        return demo(args)
    except ValueError as error:
        print(f"meanflow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
