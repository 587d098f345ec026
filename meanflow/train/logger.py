"""Run logging: ``metrics.csv`` (+ TensorBoard when installed) and a progress line.

:class:`RunLogger` appends one CSV row per :meth:`~RunLogger.log` call (``step`` first, then the
scalars in first-seen order), flushed at once so a killed run keeps its log. A key that appears
later adds a column: the file is rewritten (atomically) with the wider header, earlier rows
empty in it. Values: numbers (Python, numpy or 0-d tensors, written with ``repr`` so floats are
exact) and short strings (e.g. the phase ``"A"``; not sent to TensorBoard).

Resuming: ``RunLogger(out_dir, resume_step=S)`` drops the rows with step > S before appending
(and TensorBoard purges its events after S), so the log of a resumed run equals that of an
uninterrupted one, provided the loop logs a step's row before it checkpoints that step.

:class:`Progress` shows step/total, loss, phase, steps/s and ETA: a tqdm bar when tqdm imports
(and ``use_tqdm`` is not False), otherwise a plain line every ``every`` steps.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .atomic import atomic_write_text

__all__ = ["RunLogger", "Progress", "read_metrics"]

METRICS = "metrics.csv"


def _scalar(value: Any) -> Any:
    """A Python number or string for one CSV cell (0-d tensors / numpy scalars via ``item()``)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"expected a number or a string, got {type(value).__name__}")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def read_metrics(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows as {column: text}) of a metrics CSV; ([], []) if the file is missing/empty."""
    path = Path(path)
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _step_of(row: dict[str, str]) -> int | None:
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


def _resumed_rows(path: Path, resume_step: int) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows with step <= resume_step) of the metrics CSV a run being resumed left.

    Only complete lines count: a crash (power loss, a full disk) can leave the last row cut
    short (``12`` of ``125,...``, which would pass for step 12) or a NUL-filled tail; such a
    torn last line, and any row whose step is not an integer, is dropped rather than kept or
    allowed to stop the resume."""
    if not path.is_file():
        return [], []
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    kept = [r for r in rows if (step := _step_of(r)) is not None and step <= resume_step]
    return list(reader.fieldnames or []), kept


def _tensorboard_writer(log_dir: Path, purge_step: int | None):
    """A SummaryWriter, or None (with one printed note) if TensorBoard cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as err:  # ImportError, or a broken tensorboard install
        print(f"meanflow: TensorBoard logging off ({type(err).__name__}: {err}); "
              f"metrics still go to {METRICS}", file=sys.stderr)
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


class RunLogger:
    """Metrics of a run: ``out_dir/metrics.csv`` and, optionally, TensorBoard in ``out_dir/tb``.

    Args:
        out_dir: the run folder (created if missing).
        tensorboard: also write TensorBoard scalars if the package imports (default True).
        resume_step: when resuming from a checkpoint of this step, rows with a larger step are
            dropped first. None (default): a fresh log (an existing metrics.csv is replaced).
        columns: optional initial column order (after ``step``).
    """

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True,
                 resume_step: int | None = None, columns: list[str] | tuple[str, ...] = ()):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS
        header, rows = _resumed_rows(self.path, resume_step) if resume_step is not None else ([], [])
        self.columns: list[str] = ["step"] + [c for c in header if c != "step"]
        self.columns += [c for c in columns if c not in self.columns]
        self._file: TextIO | None = None
        self._rewrite(rows)
        purge = None if resume_step is None else resume_step + 1
        self.writer = _tensorboard_writer(self.out_dir / "tb", purge) if tensorboard else None

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """Atomically replaces the CSV with ``rows`` under the current columns; reopens for append."""
        if self._file is not None:
            self._file.close()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n", extrasaction="ignore")
        if len(self.columns) > 1 or rows:
            w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())
        self._file = open(self.path, "a", newline="", encoding="utf-8")

    def log(self, step: int, **scalars) -> None:
        """Appends the row ``step, scalars...`` (flushed) and sends numbers to TensorBoard."""
        if self._file is None:
            raise ValueError("log: the logger is closed")
        values = {}
        for key, value in scalars.items():
            try:
                values[key] = _scalar(value)
            except TypeError as err:
                raise TypeError(f"{key}: {err}") from None
        new = [k for k in values if k not in self.columns]
        if new:
            header, rows = read_metrics(self.path)
            self.columns += new
            self._rewrite(rows)
        if self._file.tell() == 0:
            csv.writer(self._file, lineterminator="\n").writerow(self.columns)
        row = {"step": str(int(step)), **{k: _cell(v) for k, v in values.items()}}
        csv.DictWriter(self._file, fieldnames=self.columns, lineterminator="\n").writerow(row)
        self._file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, int(step))

    def close(self) -> None:
        """Closes the CSV and the TensorBoard writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A progress line for steps ``initial..total``.

    Args:
        total: the last step.
        initial: the step the run starts (or resumes) from.
        every: plain mode prints a line every ``every`` steps (and at the last step).
        use_tqdm: None (default): tqdm if it imports and the stream is a terminal; True/False
            force it on/off.
        file: the stream (default ``sys.stderr``).
    """

    def __init__(self, total: int, initial: int = 0, every: int = 10, use_tqdm: bool | None = None,
                 file: TextIO | None = None):
        self.total, self.initial, self.every = int(total), int(initial), max(1, int(every))
        self.file = file or sys.stderr
        self.step = self.initial
        self.start = time.perf_counter()
        self.bar = None
        if use_tqdm is None:
            use_tqdm = bool(getattr(self.file, "isatty", lambda: False)())
        if use_tqdm:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=self.total, initial=self.initial, file=self.file,
                                dynamic_ncols=True, unit="step")
            except ImportError:
                self.bar = None

    def rate(self) -> float:
        """Steps per second since the start (0 before the first step)."""
        elapsed = time.perf_counter() - self.start
        done = self.step - self.initial
        return done / elapsed if done > 0 and elapsed > 0 else 0.0

    def line(self, loss: float | None = None, phase: str | None = None, **extra) -> str:
        """The text of the progress line at the current step."""
        rate = self.rate()
        eta = (self.total - self.step) / rate if rate > 0 else float("inf")
        parts = [f"step {self.step}/{self.total}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        if phase is not None:
            parts.append(f"phase {phase}")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()]
        parts += [f"{rate:.2f} step/s", f"ETA {_duration(eta)}"]
        return " | ".join(parts)

    def update(self, step: int, loss: float | None = None, phase: str | None = None, **extra) -> None:
        """Moves to ``step`` and shows loss, phase (A/B/C), extras, steps/s and ETA."""
        self.step = int(step)
        if self.bar is not None:
            self.bar.update(self.step - self.bar.n)
            post = [f"loss={float(loss):.4g}"] if loss is not None else []
            post += [f"phase={phase}"] if phase is not None else []
            post += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()]
            self.bar.set_postfix_str(" ".join(post), refresh=False)
        elif (self.step - self.initial) % self.every == 0 or self.step >= self.total:
            print(self.line(loss, phase, **extra), file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
