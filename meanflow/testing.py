"""Comparison helpers shared by the tests and the GPU check.

``check_pair_op`` checks a whole fused JVP op (pair form, ``torch.func.jvp``, forward-AD dual
tensors, gradients) against its plain-torch formula in float64, with that rule.

The rule, as FlashAttention's tests use it: a kernel in a low-precision dtype may be at most
``ratio`` times further from a float64 oracle than PyTorch's own computation in that dtype,
plus a floor of the dtype's rounding level (relative to the oracle's norm, and absolute for
unit-scale values, so an oracle that is exactly zero, such as the key gradient of a single
visible key, still leaves room for rounding).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD

# Absolute floors of the relative error, per dtype.
ERROR_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


# diffusers' own test configuration of FluxTransformer2DModel, and variants with more blocks and
# with the guidance embedding: the models of the FLUX exactness tests.
TINY_FLUX_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        axes_dims_rope=[4, 4, 8])
FLUX_TEST_CONFIGS = {
    "tiny": TINY_FLUX_CONFIG,
    "deep": dict(TINY_FLUX_CONFIG, num_layers=2, num_single_layers=2),
    "guided": dict(TINY_FLUX_CONFIG, guidance_embeds=True),
}


def triton_param(*values):
    """A pytest parameter set whose first value is the 'triton' backend, skipped where Triton
    cannot run (no CUDA, and no TRITON_INTERPRET=1 set before import)."""
    import os

    import pytest

    can_run = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    reason = "MEANFLOW_BACKEND=triton on CPU needs TRITON_INTERPRET=1 set before import"
    return pytest.param("triton", *values, marks=pytest.mark.skipif(not can_run, reason=reason))


def backend_dtypes(backend: str) -> list[torch.dtype]:
    """The dtypes a backend is tested in here: the Triton interpreter's bf16 products are wrong,
    so on a CPU-only machine Triton is checked in float32 and float16 (bf16 by the GPU tests)."""
    if backend == "reference":
        return [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    if torch.cuda.is_available():
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (NaN if either holds a NaN)."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("nan")
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_gpu_errors(label: str, dtype: torch.dtype, names: Sequence[str], ours: Sequence[torch.Tensor],
                      oracle: Sequence[torch.Tensor], baseline: Sequence[torch.Tensor]) -> None:
    """The GPU tests' rule: each relative error of ``ours`` against the float64 ``oracle`` is at most
    twice PyTorch's own in ``dtype`` (``baseline``), itself taken as at least 1e-3 in float16 and
    8e-3 otherwise; each is printed as a ``GPU-ERR {label} {dtype} {name}`` line for gpu_check.sh."""
    for name, actual, expected, base in zip(names, ours, oracle, baseline, strict=True):
        base_err = max(1e-3 if dtype == torch.float16 else 8e-3,
                       float((base.double() - expected).norm() / expected.norm()))
        err = float((actual.double() - expected).norm() / expected.norm())
        print(f"GPU-ERR {label} {dtype} {name}: ours {err:.2e} baseline {base_err:.2e} "
              f"ratio {err / base_err:.2f}")
        assert err <= 2 * base_err, f"{name}: {err:.3e} > 2 x {base_err:.3e}"


def assert_close_to_oracle(
    name: str,
    actual: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor | None = None,
    ratio: float = 2.0,
    magnitude: float = 1.0,
) -> float:
    """Asserts ‖actual − oracle‖ <= ratio·‖baseline − oracle‖ + floor·(‖oracle‖ + magnitude·sqrt(numel)).

    Args:
        name: what is compared, for the message.
        actual: the result under test, any float dtype; its dtype picks the floor.
        oracle: the float64 result.
        baseline: the same computation by PyTorch in actual's dtype, or None (floor only).
        magnitude: the typical size of the intermediates the result is computed from, for
            results that cancel to (near) zero.

    Returns:
        The relative error of ``actual``.
    """
    if actual.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != oracle {tuple(oracle.shape)}")
    oracle = oracle.double()
    diff = (actual.double() - oracle).norm().item()
    base = 0.0 if baseline is None else (baseline.double() - oracle).norm().item()
    bound = ratio * base + ERROR_FLOOR[actual.dtype] * (oracle.norm().item() + magnitude * oracle.numel() ** 0.5)
    if not diff <= bound:  # also catches NaN
        raise AssertionError(f"{name}: error norm {diff:.3e} > bound {bound:.3e} (baseline {base:.3e}, "
                             f"oracle norm {oracle.norm().item():.3e}, dtype {actual.dtype})")
    return relative_error(actual, oracle)


def finite_or_none(baseline: Sequence[torch.Tensor] | None, i: int) -> torch.Tensor | None:
    """``baseline[i]`` (PyTorch's result in the low-precision dtype) for
    :func:`assert_close_to_oracle`, or None when there is no baseline or it overflowed there
    (then the floor alone judges)."""
    if baseline is None or not torch.isfinite(baseline[i]).all():
        return None
    return baseline[i]


def _select(full: Sequence, which: Sequence[int], values: Sequence) -> list:
    out = list(full)
    for i, v in zip(which, values):
        out[i] = v
    return out


def _jvp_and_grads(fn, primals, tangents, diff, grad_out):
    """(y, ẏ, grads of diff primals) of ``fn`` by torch.func.jvp over the primals with tangents,
    then autograd of y. Primals without a tangent are closed over."""
    primals = [p.detach().requires_grad_(i in diff) if isinstance(p, torch.Tensor) else p
               for i, p in enumerate(primals)]
    moving = [i for i, t in enumerate(tangents) if t is not None]
    if moving:
        y, y_dot = torch.func.jvp(lambda *m: fn(*_select(primals, moving, m)),
                                  tuple(primals[i] for i in moving), tuple(tangents[i] for i in moving))
    else:
        y, y_dot = fn(*primals), None
    grads = torch.autograd.grad(y, [primals[i] for i in diff], grad_out) if diff else ()
    return y, y_dot, grads


def check_pair_op(
    formula: Callable[..., torch.Tensor],
    functional: Callable[..., torch.Tensor],
    pair: Callable[[Sequence, Sequence], tuple[torch.Tensor, torch.Tensor]],
    primals: Sequence[torch.Tensor | None],
    tangents: Sequence[torch.Tensor | None],
    differentiable: Sequence[bool],
    grad_out: torch.Tensor,
    magnitude: float = 1.0,
    tangent_magnitude: float | None = None,
) -> dict[str, float]:
    """Asserts that the op matches ``formula`` and returns the relative errors.

    Args:
        formula: the plain-torch formula f(*primals) (run in float64 for the oracle and in the
            test dtype as the baseline).
        functional: our drop-in f(*primals).
        pair: ours ``(primals, tangents) -> (y, ẏ)``.
        primals: the inputs in the test dtype (None for an absent optional input).
        tangents: one per primal, None where absent.
        differentiable: per primal, whether its gradient is checked.
        grad_out: the output gradient, in the output's dtype.
        magnitude, tangent_magnitude: the typical size of the intermediates (see
            ``assert_close_to_oracle``) for y/gradients and for ẏ.
    """
    dtype = grad_out.dtype
    diff = [i for i, d in enumerate(differentiable) if d]
    tangent_magnitude = magnitude if tangent_magnitude is None else tangent_magnitude

    def wide(t):
        return t.double() if isinstance(t, torch.Tensor) else t

    oracle = _jvp_and_grads(formula, [wide(p) for p in primals], [wide(t) for t in tangents], diff, wide(grad_out))
    baseline = (None if dtype == torch.float64
                else _jvp_and_grads(formula, primals, tangents, diff, grad_out))
    errors: dict[str, float] = {}

    def check(name, actual, index, grad_index=None, mag=magnitude):
        exp = oracle[index] if grad_index is None else oracle[2][grad_index]
        base = None if baseline is None else (baseline[index] if grad_index is None else baseline[2][grad_index])
        errors[name] = assert_close_to_oracle(name, actual, exp, base, magnitude=mag)

    # Pair form: y differentiable, ẏ detached.
    leaves = [p.detach().requires_grad_(i in diff) if isinstance(p, torch.Tensor) else p
              for i, p in enumerate(primals)]
    y, y_dot = pair(leaves, tangents)
    assert y.dtype == dtype, (y.dtype, dtype)
    assert y_dot.grad_fn is None and not y_dot.requires_grad, "the pair tangent must be detached"
    check("y", y, 0)
    if oracle[1] is not None:
        check("y_dot", y_dot, 1, mag=tangent_magnitude)
    else:
        assert not y_dot.any(), "no tangent given: ẏ must be zeros"
    if diff:
        grads = torch.autograd.grad(y, [leaves[i] for i in diff], grad_out)
        for k, (i, g) in enumerate(zip(diff, grads)):
            check(f"grad[{i}]", g, 2, k)

    if oracle[1] is None:
        return errors
    # torch.func.jvp of the drop-in, then backward through its primal.
    y2, y2_dot, grads2 = _jvp_and_grads(functional, primals, tangents, diff, grad_out)
    assert not y2_dot.requires_grad, "the forward-AD tangent must carry no graph"
    check("func.jvp y", y2, 0)
    errors["func.jvp y_dot"] = assert_close_to_oracle(
        "func.jvp y_dot", y2_dot, oracle[1], None if baseline is None else baseline[1], magnitude=tangent_magnitude)
    for k, (i, g) in enumerate(zip(diff, grads2)):
        check(f"func.jvp grad[{i}]", g, 2, k)
    # forward_ad dual tensors.
    with fwAD.dual_level():
        duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        y3 = functional(*duals)
        y3_primal, y3_dot = fwAD.unpack_dual(y3)
        assert y3_dot is not None and y3_dot.grad_fn is None
        errors["dual y_dot"] = assert_close_to_oracle(
            "dual y_dot", y3_dot, oracle[1], None if baseline is None else baseline[1], magnitude=tangent_magnitude)
    return errors


# --------------------------------------------------------------------------------------------
# Whole runs of `meanflow distill`: launching ranks and comparing run folders
# --------------------------------------------------------------------------------------------

def check_loss_under_transforms(loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    """A scalar loss of x under torch.func.grad, torch.func.jvp, a forward-AD dual level and
    torch.func.vmap (over a stacked copy) against its ``.backward()`` gradient g: the gradients
    equal g and the tangents ⟨g, ẋ⟩, to float32 rounding."""
    leaf = x.detach().clone().requires_grad_()
    loss(leaf).backward()
    g = leaf.grad
    direction = torch.randn_like(x)
    expected_tangent = (g.double() * direction.double()).sum()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.func.grad(loss)(x), g, **tol)
    _, tangent = torch.func.jvp(loss, (x,), (direction,))
    torch.testing.assert_close(tangent.double(), expected_tangent, **tol)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(loss(fwAD.make_dual(x, direction))).tangent
    torch.testing.assert_close(tangent.double(), expected_tangent, **tol)
    batched = torch.func.vmap(torch.func.grad(loss))(torch.stack([x, x]))
    torch.testing.assert_close(batched, torch.stack([g, g]), **tol)


def torchrun(ranks: int, *args: str, timeout: float = 300):
    """``torchrun --standalone --nproc-per-node ranks ARGS`` on the CPU (plain-torch backend, one
    thread per rank); the ``subprocess.CompletedProcess`` with text stdout and stderr."""
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, MEANFLOW_BACKEND="reference", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    # Its own session, so that a run past the timeout is killed with all its ranks.
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise AssertionError(f"torchrun ran past {timeout} s and was killed:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def distill_args(out, *overrides: str, preset: str = "tiny", resume: bool = False) -> list[str]:
    """The arguments of ``meanflow distill --preset PRESET --out OUT --set O ... [--resume]``."""
    args = ["distill", "--preset", preset, "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


def state_bytes(tensors) -> int:
    """Bytes of the tensors this process holds (a DTensor's local shard), 0-d ones (optimizer
    step counters) and None left out."""
    total = 0
    for t in tensors:
        if t is None or t.dim() == 0:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def metrics_rows(run) -> list[dict]:
    """The rows of a run folder's ``metrics.csv``."""
    import csv
    from pathlib import Path

    with open(Path(run) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


METRIC_COLUMNS = ("loss", "meanflow", "mse", "align", "fake", "grad_norm", "lr")


def assert_same_metrics(got: list[dict], want: list[dict], rel: float = 1e-5) -> None:
    """Same steps, phases and skips, and every logged figure within ``rel`` (NaN where NaN)."""
    import math

    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g["phase"] == w["phase"] and g["skipped"] == w["skipped"]
        for key in METRIC_COLUMNS:
            a, b = float(g[key]), float(w[key])
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-7), \
                (g["step"], key, a, b)


def student_weight_difference(run_a, run_b) -> float:
    """The largest absolute difference between the exported students (``student/``) of two run
    folders, which must hold the same tensors."""
    from pathlib import Path

    from safetensors.torch import load_file

    def tensors(run):
        out = {}
        for path in sorted((Path(run) / "student").rglob("*.safetensors")):
            out.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
        return out

    a, b = tensors(run_a), tensors(run_b)
    assert a.keys() == b.keys() and a, (sorted(a.keys() ^ b.keys())[:5], len(a))
    return max(float((a[k] - b[k]).abs().max()) for k in a)
