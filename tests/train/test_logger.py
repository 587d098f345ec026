"""meanflow.train.logger: CSV rows, new columns, resume truncation, no-TensorBoard fallback, Progress."""
import io
import sys

import pytest
import torch

from meanflow.train.logger import Progress, RunLogger, read_metrics


def _csv(path):
    return (path / "metrics.csv").read_text()


def test_rows_and_new_columns(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(1, loss=0.5, phase="A")
        assert _csv(tmp_path) == "step,loss,phase\n1,0.5,A\n"  # flushed at once
        log.log(2, loss=torch.tensor(0.25), lr=1e-4)
    header, rows = read_metrics(tmp_path / "metrics.csv")
    assert header == ["step", "loss", "phase", "lr"]
    assert rows == [{"step": "1", "loss": "0.5", "phase": "A", "lr": ""},
                    {"step": "2", "loss": "0.25", "phase": "", "lr": "0.0001"}]
    assert float(rows[1]["loss"]) == 0.25 and float(repr(1 / 3)) == 1 / 3


def test_resume_equals_uninterrupted(tmp_path):
    def run(out, steps, resume_step=None):
        with RunLogger(out, tensorboard=False, resume_step=resume_step) as log:
            for s in steps:
                log.log(s, loss=1.0 / s, **({"align": 2.0 * s} if s >= 4 else {}))

    run(tmp_path / "a", range(1, 7))
    run(tmp_path / "b", range(1, 6))        # killed after logging step 5 ...
    run(tmp_path / "b", range(4, 7), 3)     # ... resumed from the checkpoint of step 3
    assert _csv(tmp_path / "a") == _csv(tmp_path / "b")
    run(tmp_path / "a", range(1, 3))        # a fresh (non-resumed) log replaces the old one
    assert _csv(tmp_path / "a") == "step,loss\n1,1.0\n2,0.5\n"


def test_without_tensorboard(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with RunLogger(tmp_path, tensorboard=True) as log:
        assert log.writer is None
        log.log(1, loss=1.0)
    assert "TensorBoard" in capsys.readouterr().err
    assert _csv(tmp_path) == "step,loss\n1,1.0\n"


def test_with_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    with RunLogger(tmp_path, tensorboard=True) as log:
        assert log.writer is not None
        log.log(1, loss=1.0, phase="A")
    assert any((tmp_path / "tb").iterdir())


def test_bad_value(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(TypeError, match="loss"):
            log.log(1, loss=[1.0])


def test_progress_plain_lines():
    out = io.StringIO()
    bar = Progress(total=20, initial=10, every=5, use_tqdm=False, file=out)
    for step in range(11, 21):
        bar.update(step, loss=0.123456, phase="B", align=0.5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 15/20 | loss 0.1235 | phase B | align 0.5")
    assert "step/s" in lines[-1] and "ETA" in lines[-1] and lines[-1].startswith("step 20/20")


def test_progress_tqdm():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    bar = Progress(total=4, use_tqdm=True, file=out)
    for step in range(1, 5):
        bar.update(step, loss=1.0, phase="C")
    bar.close()
    assert "4/4" in out.getvalue() and "phase=C" in out.getvalue()


@pytest.mark.parametrize("tail", [b"1", b"12,0.5", b"\x00" * 64, b"1\x00\x00\x00", b"\xff\xfe"],
                         ids=["step-cut", "row-cut", "nul-tail", "digit-then-nul", "not-utf8"])
def test_resume_drops_a_torn_last_line(tmp_path, tail):
    """A crash (power loss, full disk) can leave the last row cut short or a NUL-filled tail. On
    resume that line is no row: it was neither kept as a bogus row (a "12" cut from "125" is a
    step <= the checkpoint's) nor allowed to stop the resume (int("\\x00...") raised)."""
    def run(out, steps, resume_step=None):
        with RunLogger(out, tensorboard=False, resume_step=resume_step) as log:
            for s in steps:
                log.log(s, loss=1.0 / s, phase="A")

    run(tmp_path / "a", range(1, 21))
    run(tmp_path / "b", range(1, 16))
    with open(tmp_path / "b" / "metrics.csv", "ab") as f:
        f.write(tail)
    run(tmp_path / "b", range(14, 21), 13)
    assert _csv(tmp_path / "a") == _csv(tmp_path / "b")
