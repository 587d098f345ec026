"""meanflow.train.checkpoint: exact round trips, pruning, validation, and the atomic guarantee."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow.train.atomic import atomic_write
from meanflow.train.checkpoint import (find_checkpoint, list_checkpoints, load_checkpoint,
                                       save_checkpoint)
from meanflow.train.codec import join_tensors, split_tensors
from meanflow.train.rng import capture_rng, restore_rng

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


def _trained_adamw(dtype=torch.float32):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)).to(dtype)
    model.register_buffer("count", torch.arange(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4, dtype=dtype)).square().mean().backward()
        opt.step()
    return model, opt


def _assert_same_state(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_exact(tmp_path, dtype):
    model, opt = _trained_adamw(dtype)
    gen = torch.Generator().manual_seed(7)
    torch.rand(3, generator=gen)
    state = {"schedule": {"b_start": 3, "losses": [0.5, 0.25]}, "pair": (1, 2), "ids": {0: "a"},
             "nan": float("nan"), "lr": 1e-3 / 3}
    save_checkpoint(tmp_path, 12, {"student": model.state_dict()}, state,
                    optimizers={"student": opt}, generators={"data": gen})
    # What the RNG streams give next, then disturb them.
    expect = (torch.rand(4), torch.rand(4, generator=gen), random.random(), np.random.rand())
    torch.rand(9), torch.rand(9, generator=gen), random.random(), np.random.rand()

    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 12 and ckpt.groups == ("student",) and ckpt.optimizers == ("student",)
    assert ckpt.state["pair"] == (1, 2) and ckpt.state["ids"] == {0: "a"}
    assert ckpt.state["lr"] == 1e-3 / 3 and np.isnan(ckpt.state["nan"])
    fresh, fresh_opt = _trained_adamw(dtype)
    ckpt.restore_module("student", fresh)
    _assert_same_state(fresh.state_dict(), model.state_dict())
    ckpt.restore_optimizer("student", fresh_opt)
    _assert_same_state(fresh_opt.state_dict(), opt.state_dict())
    _assert_same_state(ckpt.optimizer_state("student"), opt.state_dict())
    ckpt.restore_rng({"data": gen})
    got = (torch.rand(4), torch.rand(4, generator=gen), random.random(), np.random.rand())
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1]) and got[2:] == expect[2:]


def test_codec_round_trip():
    obj = {"a": (1, 2.5, None, [True, "x"]), 3: torch.arange(4), "n": {"__tensor__": 1},
           (1, 2): torch.zeros(2, dtype=torch.bfloat16)}
    structure, tensors = split_tensors(obj)
    json.dumps(structure)
    _assert_same_state(join_tensors(json.loads(json.dumps(structure)), tensors), obj)
    with pytest.raises(TypeError, match="bad"):
        split_tensors({"bad": object()})


def test_rng_capture_restore():
    gen = torch.Generator().manual_seed(1)
    state = capture_rng({"g": gen})
    a = (torch.randn(3), torch.randn(3, generator=gen), random.random(), np.random.rand())
    restore_rng(state, {"g": gen})
    b = (torch.randn(3), torch.randn(3, generator=gen), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]
    with pytest.raises(ValueError, match="other"):
        restore_rng(state, {"other": torch.Generator()})


def test_keep_pruning_and_same_step(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": {"x": torch.full((2,), float(step))}}, {"s": step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    # A second save at the same step (e.g. the final one) gets a new folder, latest moves to it.
    save_checkpoint(tmp_path, 4, {"w": {"x": torch.full((2,), 40.0)}}, {"s": 40}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004", "step-000004.1"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path.name == "step-000004.1" and ckpt.state == {"s": 40}
    assert load_checkpoint(tmp_path, step=3).state == {"s": 3}
    assert load_checkpoint(tmp_path / "step-000004").state == {"s": 4}
    save_checkpoint(tmp_path, 5, {"w": {"x": torch.zeros(1)}}, {}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["latest", "step-000005"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000005"]
    save_checkpoint(tmp_path, 6, {"w": {"x": torch.zeros(1)}}, {}, keep=None)
    assert len(list_checkpoints(tmp_path)) == 2


def test_corrupt_and_missing_files(tmp_path):
    folder = save_checkpoint(tmp_path, 1, {"student": {"x": torch.randn(64)}}, {"a": 1})
    load_checkpoint(tmp_path)
    target = folder / "student.safetensors"
    original = target.read_bytes()

    target.write_bytes(original[:-8])  # truncated
    with pytest.raises(ValueError, match="student.safetensors"):
        load_checkpoint(tmp_path)
    data = bytearray(original)
    data[-3] ^= 0xFF  # same size, flipped bits in the tensor data
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="student.safetensors.*sha256"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path, verify=False).step == 1  # the size still matches
    target.write_bytes(b"\xff" * len(original))  # garbage header
    with pytest.raises(ValueError, match="student.safetensors"):
        load_checkpoint(tmp_path, verify=False)
    target.unlink()
    with pytest.raises(ValueError, match="student.safetensors.*missing"):
        load_checkpoint(tmp_path)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json"):
        load_checkpoint(tmp_path)


def test_latest_errors_and_read_only(tmp_path):
    with pytest.raises(ValueError, match="latest"):
        load_checkpoint(tmp_path)
    assert find_checkpoint(tmp_path) is None
    folder = save_checkpoint(tmp_path, 3, {"w": {"x": torch.ones(1)}}, {})
    assert find_checkpoint(tmp_path) == folder
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    load_checkpoint(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    (tmp_path / "latest").write_text("step-000099\n")
    with pytest.raises(ValueError, match=r"latest.*step-000099.*does not exist"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="step 7"):
        load_checkpoint(tmp_path, step=7)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {}, {})
    with pytest.raises(ValueError, match="tensors"):
        save_checkpoint(tmp_path, 1, {"rng": {}}, {})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, {}, {}, keep=0)
    with pytest.raises(TypeError, match="state"):
        save_checkpoint(tmp_path, 1, {}, {"t": torch.ones(1)})
    assert list_checkpoints(tmp_path) == [] and find_checkpoint(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == []  # the failed save left nothing


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, lambda p: p.write_text("old"))

    def failing(p):
        p.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(path, failing)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


_CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from meanflow.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
    directory = sys.argv[1]
    step = load_checkpoint(directory).step + 1 if find_checkpoint(directory) else 1
    print("ready", flush=True)
    while True:
        groups = {g: {f"t{i}": torch.full((64 * 1024,), float(step)) for i in range(4)}
                  for g in ("student", "ema")}   # 2 MiB per save
        save_checkpoint(directory, step, groups, {"step": step}, keep=2)
        print(step, flush=True)
        step += 1
""")


def test_sigkill_never_breaks_the_latest_checkpoint(tmp_path):
    """Kill a process that saves checkpoints in a loop at random moments; the latest always loads."""
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    last_done = 0
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        done = [int(line) for line in out.split()]
        last_done = done[-1] if done else last_done
        ckpt = load_checkpoint(tmp_path)
        # The last reported save, or the one whose report the kill interrupted.
        assert ckpt.step in (last_done, last_done + 1)
        assert ckpt.state == {"step": ckpt.step}
        for group in ("student", "ema"):
            tensors = ckpt.tensors(group)
            assert sorted(tensors) == ["t0", "t1", "t2", "t3"]
            assert all(bool((t == ckpt.step).all()) and t.numel() == 64 * 1024 for t in tensors.values())
        last_done = ckpt.step
    assert last_done >= 2
