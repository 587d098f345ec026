"""The launchers' integer helpers agree with Triton's own (which cost more per call), the grid
rule, and the device the launchers run on."""
import contextlib
import importlib
import inspect
import pkgutil

import pytest
import torch
import triton

import meanflow.kernels
from meanflow.kernels.launch import cdiv, next_power_of_2, on_tensor_device


def test_cdiv_matches_triton():
    for numerator in range(0, 300):
        for denominator in (1, 2, 3, 7, 16, 64, 128):
            assert cdiv(numerator, denominator) == triton.cdiv(numerator, denominator)


def test_next_power_of_2_matches_triton():
    for n in range(1, 70000, 7):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    for n in (1, 2, 3, 64, 65, 4096, 4097, 2**20):
        assert next_power_of_2(n) == triton.next_power_of_2(n)


# --------------------------------------------------------------------------------------------
# The grid rule (split_program_id): CUDA caps a grid's axes 1 and 2 at 65535 programs, so no
# launch may put the batch (or batch · heads) there. Run every op's forward and backward at two
# batch sizes through the interpreter and compare the grids it is given.
# --------------------------------------------------------------------------------------------

def _grids_of(run, monkeypatch):
    import triton.runtime.interpreter as interpreter

    grids = []
    original = interpreter.interpreter_builder.set_grid_dim
    with monkeypatch.context() as patch:
        patch.setattr(interpreter.interpreter_builder, "set_grid_dim",
                      lambda *dims: grids.append(dims) or original(*dims))
        run()
    return grids


def _every_op(batch):
    from meanflow import ops

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    x, sc, q, table = randn(batch, 5, 8), randn(batch, 8), randn(batch, 3, 5, 8), torch.randn(5, 8)
    outputs = [
        ops.jvp_rms_norm_pair(x, x.detach(), randn(8))[0],
        ops.jvp_layer_norm_modulate_pair(x, x.detach(), sc, None, sc, None)[0],
        ops.jvp_gated_residual_pair(x, x.detach(), sc, None, x, x.detach())[0],
        ops.jvp_rope_pair(q, q.detach(), table, table)[0],
        ops.jvp_attention_pair(q, q, q, q.detach(), q.detach(), q.detach())[0],
        ops.adaptive_weighted_loss(x, x.detach() + 1)[0],
        ops.alignment_loss(x, x.detach() + 1, x.detach() - 1)[0],
    ]
    sum(o.sum() for o in outputs).backward()


def test_no_launch_puts_the_batch_on_grid_axis_1_or_2(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    _every_op(1)  # first calls also launch for the autotuners' caches
    small, large = (_grids_of(lambda b=b: _every_op(b), monkeypatch) for b in (1, 3))
    assert len(small) == len(large) >= 14  # a forward and a backward launch per op at least
    for one, three in zip(small, large):
        assert one[1:] == three[1:], f"a launch's grid axes 1-2 grow with the batch: {one} -> {three}"


# --------------------------------------------------------------------------------------------
# The device: Triton launches on the current CUDA device, so every launcher first makes its
# tensors' device current (on_tensor_device). Checked here with stand-in tensors and a recorded
# torch.cuda.device; a GPU test with two devices runs the real kernels on cuda:1.
# --------------------------------------------------------------------------------------------

class _OnDevice:
    def __init__(self, device: str):
        self.device = torch.device(device)


def test_on_tensor_device_makes_the_tensors_device_current(monkeypatch):
    current, entered = [0], []

    @contextlib.contextmanager
    def device_context(device):
        entered.append(device)
        previous, current[0] = current[0], device.index
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device_context)
    launcher = on_tensor_device(lambda first, *args, **kwargs: (current[0], args, kwargs))

    assert launcher(_OnDevice("cuda:1"), 2, k=3) == (1, (2,), {"k": 3})
    assert entered == [torch.device("cuda:1")] and current[0] == 0  # restored after the launch
    assert launcher(_OnDevice("cuda:0")) == (0, (), {}) and len(entered) == 1  # already current
    assert launcher(_OnDevice("cpu")) == (0, (), {}) and len(entered) == 1  # the interpreter


def _triton_launchers():
    """Every public ``<op>_forward`` / ``<op>_backward`` of a kernels module that defines kernels."""
    for info in pkgutil.iter_modules(meanflow.kernels.__path__):
        module = importlib.import_module(f"meanflow.kernels.{info.name}")
        if "@triton.jit" not in inspect.getsource(module):
            continue
        for name, fn in vars(module).items():
            if name.endswith(("_forward", "_backward")) and not name.startswith("_") and callable(fn) \
                    and getattr(fn, "__module__", None) == module.__name__:
                yield f"{info.name}.{name}", fn


def test_every_triton_launcher_runs_on_its_tensors_device():
    launchers = dict(_triton_launchers())
    assert len(launchers) >= 16, sorted(launchers)
    wrapper = on_tensor_device(lambda first: first).__code__.co_name
    unguarded = [name for name, fn in launchers.items() if fn.__code__.co_name != wrapper]
    assert not unguarded, unguarded


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_attention_on_a_device_that_is_not_current():
    from meanflow.ops import jvp_attention_pair
    from meanflow.reference.jvp_attention import jvp_attention_forward

    torch.cuda.set_device(0)
    q, k, v, tq, tk, tv = (torch.randn(1, 2, 100, 64, device="cuda:1", dtype=torch.float32) for _ in range(6))
    out, out_dot = jvp_attention_pair(q, k, v, tq, tk, tv)
    want, want_dot, _ = jvp_attention_forward(*(t.double() for t in (q, k, v, tq, tk, tv)))
    assert out.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_dot.double(), want_dot, atol=1e-4, rtol=1e-4)
