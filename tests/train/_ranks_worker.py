"""Run by ``torchrun`` from test_distributed.py (not a test module itself).

    _ranks_worker.py fail ARGS...       meanflow ARGS..., with rank 1 raising at step 1
    _ranks_worker.py measure OUT CONFIG_OVERRIDES...
        rank 0 writes to OUT (JSON) the bytes of its shards after a phase-C step, by planner row,
        and the planner's figures for as many GPUs as ranks
    _ranks_worker.py bf16 OUT CONFIG_OVERRIDES...
        the tiny preset's 4 steps with run.dtype bfloat16 forced onto the CPU (FSDP2's bf16
        mixed-precision policy under bf16 autocast), then 1-step samples of the EMA student;
        rank 0 writes the losses and the samples to OUT (JSON). Also runs on one process.
    _ranks_worker.py compiled OUT ARGS...
        meanflow ARGS... (a run with model.compile set); rank 0 writes to OUT (JSON) Dynamo's
        count of the graphs it compiled and the reasons of its graph breaks
    _ranks_worker.py save-fail DIR
        a sharded checkpoint save whose shard writing fails on rank 1: every rank must raise and
        leave no checkpoint; then a save that succeeds. Exit 0 when so.
"""
import json
import os
import sys

import torch


def fail(argv):
    from meanflow.cli import main
    from meanflow.train import loop

    original = loop.Distiller.step

    def step(self):
        if self.ranks.rank == 1 and self.step_index == 1:
            raise RuntimeError("injected failure on rank 1 at step 1")
        return original(self)

    loop.Distiller.step = step
    return main(argv)


def measure(out, overrides):
    from meanflow.testing import state_bytes
    from meanflow.train.config import load_config
    from meanflow.train.distributed import init_ranks, shutdown
    from meanflow.train.loop import Distiller
    from meanflow.train.plan import FAKE_ROWS, STUDENT_ROWS, plan_memory

    config = load_config("tiny", None, overrides)
    ranks, device = init_ranks(torch.device("cpu"))
    d = Distiller(config, ranks=ranks, device=device)
    phases = set()
    while "C" not in phases:  # phase C runs the fake network's optimizer too
        phases.add(d.step().phase)
    measured = {
        "student params": state_bytes(d.student.parameters()),
        "student grads": state_bytes(p.grad for p in d.student.parameters()),
        "student AdamW": state_bytes(t for s in d.optimizer.state.values() for t in s.values()),
        "student EMA": state_bytes(d.ema.state_dict().values()),
        "fake params": state_bytes(d.fake.parameters()),
        "fake grads": state_bytes(p.grad for p in d.fake.parameters()),
        "fake AdamW": state_bytes(t for s in d.fake_optimizer.state.values() for t in s.values()),
        "teacher": state_bytes(d.world.teacher.parameters()),
    }
    plan = plan_memory(config, ranks.size)
    if ranks.main:
        planned = {name: plan.bytes_of(name) for name in (*STUDENT_ROWS, *FAKE_ROWS, "teacher")}
        with open(out, "w") as f:
            json.dump({"measured": measured, "planned": planned, "ranks": ranks.size}, f)
    shutdown()
    return 0


def compiled(out, argv):
    from torch._dynamo.utils import counters

    from meanflow.cli import main

    code = main(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"unique_graphs": counters["stats"]["unique_graphs"],
                       "graph_breaks": dict(counters["graph_break"])}, f)
    return code


def bf16_config(overrides):
    """The tiny preset with run.dtype bfloat16 on the CPU, which the config refuses for users
    (CPU bf16 autocast is slow): here it stands in for a GPU's to test the mixed precision."""
    from meanflow.train.config import load_config

    config = load_config("tiny", None, overrides)
    object.__setattr__(config.run, "dtype", "bfloat16")  # past the validation
    return config


def bf16(out, overrides):
    from meanflow.train.distributed import init_ranks, shutdown
    from meanflow.train.loop import Distiller, sample_student

    config = bf16_config(overrides)
    ranks, device = init_ranks(torch.device("cpu"))
    d = Distiller(config, ranks=ranks, device=device)
    losses = [d.step().loss for _ in range(config.run.max_steps)]
    noise = torch.randn((4, *d.world.latent_shape), generator=torch.Generator().manual_seed(0))
    with d.ema_weights() as student, d.autocast():
        samples = sample_student(student, d.world, ["a handwritten digit 3"] * 4, 1, noise)
    if ranks.main:
        with open(out, "w") as f:
            json.dump({"losses": losses, "samples": samples.tolist()}, f)
    shutdown()
    return 0


def save_fail(directory):
    from pathlib import Path

    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from meanflow.train.checkpoint import find_checkpoint, load_checkpoint, save_sharded_checkpoint
    from meanflow.train.distributed import init_ranks, shutdown

    ranks, _ = init_ranks(torch.device("cpu"))
    mesh = init_device_mesh("cpu", (ranks.size,))
    weight = distribute_tensor(torch.arange(12.0).reshape(6, 2), mesh, [Shard(0)])
    original = FileSystemWriter.write_data

    def broken(self, *args, **kwargs):  # the shard files of rank 1 cannot be written
        if ranks.rank == 1:
            raise OSError("disk full on rank 1")
        return original(self, *args, **kwargs)

    FileSystemWriter.write_data = broken
    try:
        save_sharded_checkpoint(directory, 1, {"model": {"weight": weight}}, {"step": 1}, ranks=ranks)
        raise AssertionError("the save did not fail")
    except Exception as err:  # noqa: BLE001 - DCP reports rank 1's error to every rank
        assert "disk full on rank 1" in str(err), str(err)
    FileSystemWriter.write_data = original
    assert find_checkpoint(directory) is None
    assert not [p for p in Path(directory).iterdir() if p.name != "latest"], list(Path(directory).iterdir())
    ranks.barrier()  # every rank has looked before any starts the next save (its temp folder)
    save_sharded_checkpoint(directory, 2, {"model": {"weight": weight}}, {"step": 2}, ranks=ranks)
    loaded = {"model": {"weight": distribute_tensor(torch.zeros(6, 2), mesh, [Shard(0)])}}
    load_checkpoint(directory).load_sharded(loaded)
    assert torch.equal(loaded["model"]["weight"].full_tensor(), torch.arange(12.0).reshape(6, 2))
    shutdown()
    return 0


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "fail":
        sys.exit(fail(rest))
    if mode == "save-fail":
        code = save_fail(rest[0])
        # Every check has run. After a failed DCP save, the interpreter's exit sometimes aborts in
        # torch's C++ teardown ("terminate called without an active exception", about 1 run in
        # 30 here, with no Python frame left); skipping the teardown keeps that out of the result.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit({"measure": measure, "bf16": bf16, "compiled": compiled}[mode](rest[0], rest[1:]))
