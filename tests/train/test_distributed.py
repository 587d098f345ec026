"""``meanflow distill`` on two CPU processes (torchrun, gloo, FSDP2) against one process: the same
losses and the same student, sharded checkpoints resumed on one and on two ranks, a failure on
one rank ending the run with the error shown, the planner's sharded rows against the bytes
each rank holds, and model.compile under FSDP2."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from meanflow.cli import main  # noqa: E402
from meanflow.testing import (assert_same_metrics, distill_args, metrics_rows, student_weight_difference,  # noqa: E402
                              torchrun)
from meanflow.train.config import ConfigError, load_config  # noqa: E402
from meanflow.train.distributed import Ranks  # noqa: E402

WORKER = Path(__file__).with_name("_ranks_worker.py")
# The tiny preset: 4 steps through phases A, B and C with alignment; with per-block checkpointing,
# so the recompute in backward runs through the sharded blocks too.
# Teacher latents made by the run (split over the ranks when sharded).
COMMON = ("run.eval_at_end=false", "model.gradient_checkpointing=true", "data.source=teacher")


pytestmark = pytest.mark.usefixtures("reference_one_thread")


def _distill_args(out: Path, *overrides: str, resume: bool = False) -> list[str]:
    return distill_args(out, *COMMON, *overrides, resume=resume)


def _assert_same_student(got: Path, want: Path) -> None:
    # AdamW normalises each gradient element, so rounding-level differences in tiny gradient
    # elements become differences of up to lr per step: 4 steps of lr 3e-4 bound them by ~1e-3;
    # measured ~2e-5.
    worst = student_weight_difference(got, want)
    assert worst < 2e-4, worst


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["MEANFLOW_BACKEND"] = "reference"
    try:
        assert main(_distill_args(out)) == 0
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("MEANFLOW_BACKEND", None)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    result = torchrun(2, "-m", "meanflow", *_distill_args(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("distilling the digits teacher") == 1  # rank 0 alone logs
    return out


def test_two_ranks_repeat_one_process(one_process, two_ranks):
    rows = metrics_rows(two_ranks)
    assert [r["phase"] for r in rows] == ["A", "B", "B", "C"]
    assert all(r["align"] != "nan" and r["fake"] != "nan" for r in rows if r["phase"] == "C")
    assert_same_metrics(rows, metrics_rows(one_process))
    _assert_same_student(two_ranks, one_process)
    made = [load_file(str(run / "teacher_latents.safetensors"))["latents"] for run in (two_ranks, one_process)]
    assert made[0].shape == (8, 16, 4) and torch.allclose(made[0], made[1], rtol=0, atol=1e-6)
    manifest = (two_ranks / "checkpoints" / "step-000004" / "manifest.json").read_text()
    assert '"sharded"' in manifest and '"ranks": 2' in manifest
    assert (two_ranks / "samples" / "final.png").is_file()


def _rewind(run: Path, to: Path, step: int) -> Path:
    """A copy of ``run`` whose ``latest`` names its checkpoint of ``step``."""
    shutil.copytree(run, to)
    (to / "checkpoints" / "latest").write_text(f"step-{step:06d}\n")
    shutil.rmtree(to / "student")
    return to


def test_sharded_checkpoint_resumes_on_one_and_on_two_ranks(one_process, two_ranks, tmp_path):
    on_one = _rewind(two_ranks, tmp_path / "on-one", 2)
    assert main(_distill_args(on_one, resume=True)) == 0
    on_two = _rewind(two_ranks, tmp_path / "on-two", 2)
    result = torchrun(2, "-m", "meanflow", *_distill_args(on_two, resume=True))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step-000002" in result.stdout
    for run in (on_one, on_two):
        assert_same_metrics(metrics_rows(run), metrics_rows(one_process))
        _assert_same_student(run, one_process)


def test_one_process_checkpoint_resumes_on_two_ranks(one_process, tmp_path):
    run = _rewind(one_process, tmp_path / "run", 2)
    assert (run / "checkpoints" / "step-000002" / "student.safetensors").is_file()  # the one-process format
    result = torchrun(2, "-m", "meanflow", *_distill_args(run, resume=True))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_metrics(metrics_rows(run), metrics_rows(one_process))
    _assert_same_student(run, one_process)


def test_failure_on_one_rank_ends_every_rank_with_the_error(tmp_path):
    start = time.perf_counter()
    result = torchrun(2, str(WORKER), "fail", *_distill_args(tmp_path / "run"), timeout=240)
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 1" in result.stdout + result.stderr
    assert time.perf_counter() - start < 200  # torchrun stopped rank 0 rather than waiting out a timeout


def test_sharded_save_failing_on_one_rank_saves_nothing_and_raises_on_every_rank(tmp_path):
    result = torchrun(2, str(WORKER), "save-fail", str(tmp_path / "checkpoints"), timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("fake", ["full", "lora"])
def test_planner_rows_equal_the_bytes_of_each_rank(tmp_path, fake):
    """Also with adapters on the student and the fake network: FSDP2 shards the frozen copy and
    the trained factors of each block together, and the steps train the factors alone."""
    import json

    out = tmp_path / "bytes.json"
    lora = ["model.fake_lora_rank=2", "model.student_lora_rank=3"] if fake == "lora" else []
    result = torchrun(2, str(WORKER), "measure", str(out), f"run.out_dir={tmp_path / 'run'}", *lora)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ranks"] == 2
    assert report["measured"] == report["planned"]


def test_batch_must_split_over_ranks(tmp_path):
    from meanflow.train.loop import Distiller

    config = load_config("tiny", None, [f"run.out_dir={tmp_path}"])  # batch 4
    with pytest.raises(ConfigError, match="data.batch_size: 4 does not split evenly over 3 ranks"):
        Distiller(config, ranks=Ranks(rank=0, size=3))
    assert not (tmp_path / "config.yaml").exists()


def test_bf16_mixed_precision_matches_one_process(tmp_path):
    """FSDP2's bf16 policy (bf16 block parameters, float32 reduction) under bf16 autocast, with
    bf16 forced onto the CPU: the losses and the EMA student's samples stay within bf16 rounding
    of one process's bf16 autocast run (measured: 1.2 % on the phase-C loss, whose alignment term
    amplifies rounding, 0.02 % on the others, and 0.023 on samples of magnitude 2)."""
    import json

    env = dict(os.environ, MEANFLOW_BACKEND="reference", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(WORKER), "bf16", str(tmp_path / "one.json"),
                          f"run.out_dir={tmp_path / 'one'}"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, str(WORKER), "bf16", str(tmp_path / "two.json"), f"run.out_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert all(math.isfinite(x) for x in b["losses"])
    for x, y in zip(a["losses"], b["losses"]):
        assert math.isclose(x, y, rel_tol=2e-2), (a["losses"], b["losses"])
    sa, sb = torch.tensor(a["samples"]), torch.tensor(b["samples"])
    assert float((sa - sb).abs().max()) < 0.1 * float(sa.abs().max())


def test_compiled_steps_on_two_ranks_repeat_one_eager_process(one_process, tmp_path):
    """model.compile=inductor under FSDP2 (per-block checkpointing on, so the recompute runs
    through compiled, sharded blocks): the losses and the student of the eager one-process run.
    Dynamo compiled the step's code, and its graphs break only where FSDP2 hands its hooks to
    ``torch._dynamo.disable``."""
    import json

    out, counts = tmp_path / "run", tmp_path / "counts.json"
    result = torchrun(2, str(WORKER), "compiled", str(counts), *_distill_args(out, "model.compile=inductor"),
                      timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_metrics(metrics_rows(out), metrics_rows(one_process))
    _assert_same_student(out, one_process)
    dynamo = json.loads(counts.read_text())
    assert dynamo["unique_graphs"] >= 8, dynamo  # 31 measured: the blocks' code between hooks
    assert all("`disable`" in reason for reason in dynamo["graph_breaks"]), dynamo["graph_breaks"]


def test_ranks_without_a_process_group():
    single = Ranks.single()
    g = torch.Generator()
    assert single.rows(4, g) is g and single.mean(2.5, 1.0) == [2.5, 1.0] and single.all(False) is False
    assert single.share(5) == slice(0, 5) and single.gather("x") == ["x"] and single.broadcast(3) == 3
    # shares of 5 items over 3 ranks: 2, 2, 1; over 8 ranks: some empty
    assert [Ranks(rank=r, size=3).share(5) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert sum(len(range(5)[Ranks(rank=r, size=8).share(5)]) for r in range(8)) == 5
    shard = Ranks(rank=1, size=2).rows(8, g)
    assert (shard.start, shard.rows, shard.total, shard.local) == (4, 4, 8, slice(4, 8))


def test_adapters_sharded_repeat_one_process_and_resume(tmp_path):
    """Student and fake network with LoRA adapters, sharded on two ranks (frozen copies and
    trained factors in the same FSDP2 units): the run stops at step 2 with a sharded checkpoint,
    resumes on two ranks, and repeats the one-process run; the export is merged and whole."""
    lora = ("model.student_lora_rank=2", "model.fake_lora_rank=2")
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["MEANFLOW_BACKEND"] = "reference"
    try:
        assert main(_distill_args(one, *lora)) == 0
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("MEANFLOW_BACKEND", None)
    two = tmp_path / "two"
    for extra, resume in ((("run.max_steps=2",), False), ((), True)):
        result = torchrun(2, "-m", "meanflow", *_distill_args(two, *lora, *extra, resume=resume))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_metrics(metrics_rows(two), metrics_rows(one))
    _assert_same_student(two, one)


def test_adapters_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    """A one-process checkpoint of a run with adapters resumed on two ranks: its optimizer state
    (one entry per trained parameter, the factors and the (t − r) embedder, not per parameter of
    the model) reaches the right parameters, so the run repeats the uninterrupted one."""
    lora = ("model.student_lora_rank=2", "model.fake_lora_rank=2")
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["MEANFLOW_BACKEND"] = "reference"
    try:
        assert main(_distill_args(one, *lora)) == 0
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("MEANFLOW_BACKEND", None)
    run = _rewind(one, tmp_path / "run", 2)
    result = torchrun(2, "-m", "meanflow", *_distill_args(run, *lora, resume=True))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_metrics(metrics_rows(run), metrics_rows(one))
    _assert_same_student(run, one)
