"""The run report: ``report.md`` with the evaluation table, the loss curves (``loss.png``)
and the sample grids (``eval-teacher.png``, ``eval-student.png``) in the run folder."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch


def _read_metrics(path: Path) -> dict[str, list[float]]:
    columns: dict[str, list] = {}
    if not path.is_file():
        return columns
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                try:
                    columns.setdefault(key, []).append(float(value))
                except (TypeError, ValueError):
                    columns.setdefault(key, []).append(value)
    return columns


def plot_losses(metrics_csv: Path, out: Path) -> Path | None:
    """loss.png: the MeanFlow squared error (log scale), the alignment loss and the fake network's loss over steps,
    with the phase boundaries of the warm-up schedule. None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cols = _read_metrics(metrics_csv)
    if not cols.get("step"):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title in zip(axes, ("mse", "align", "fake"),
                              ("MeanFlow squared error per element", "alignment loss", "fake network FM loss")):
        pts = [(s, v) for s, v in zip(cols["step"], cols.get(key, [])) if isinstance(v, float) and math.isfinite(v)]
        if pts:
            ax.plot(*zip(*pts), lw=1)
            if key == "mse" and min(v for _, v in pts) > 0:
                ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        phases = cols.get("phase", [])
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(cols["step"][i], color="grey", ls=":", lw=0.8)
                ax.text(cols["step"][i], ax.get_ylim()[1], f" {phases[i]}", fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(out_dir: Path, config, result: dict, world, phase_a_steps: int | None = None) -> Path:
    """Writes report.md (and loss.png, eval-*.png) into ``out_dir``; returns report.md's path.

    ``phase_a_steps``: how long phase A ran (the schedule's ``b_start``), which
    ``method.schedule.switch="loss"`` may end before the configured ``phase_a_steps``; None:
    the configured length."""
    from meanflow.eval.evaluate import markdown_table
    from meanflow.train.atomic import atomic_write_text

    out_dir = Path(out_dir)
    loss_png = plot_losses(out_dir / "metrics.csv", out_dir / "loss.png")
    grids = {}
    prompts = result["prompts"]
    for model in ("teacher", "student"):
        keys = [k for k in result["samples"] if k.startswith(model + "-")]
        if keys:
            world.save_grid(torch.cat([result["samples"][k] for k in keys]), str(out_dir / f"eval-{model}.png"),
                            nrow=len(prompts))
            grids[model] = (f"eval-{model}.png", [k.split("-")[1] for k in keys])
    rows = {(r["model"], r["steps"]): r for r in result["rows"]}
    schedule = config.method.schedule
    phase_a = f"A {schedule.phase_a_steps if phase_a_steps is None else phase_a_steps}"
    if schedule.switch == "loss":
        phase_a += f" (switch=loss: at most {schedule.phase_a_steps})"
    lines = [f"# MeanFlow distillation report: {config.model.kind}", "",
             f"Run folder `{out_dir}`; {config.run.max_steps} steps, batch {config.data.batch_size}, "
             f"guidance {config.method.guidance.mode} {list(config.method.guidance.scales)}; warm-up "
             f"{phase_a} / B {schedule.phase_b_steps} steps "
             f"(discrete target {config.method.target.kind}), then differential"
             f"{' + alignment' if schedule.alignment else ''}.", "",
             f"{len(prompts)} prompts × {result['samples_per_prompt']} samples, the same noise for every row. "
             "Fréchet distance and accuracy use the digits classifier's features; the reference set is "
             "the held-out test split.", "", markdown_table(result), ""]
    def verdict(ours: float, theirs: float, lower_is_better: bool) -> str:
        if ours == theirs:
            return "equal"
        return "better" if (ours < theirs) == lower_is_better else "worse"

    verdicts = []
    for k in sorted({r["steps"] for r in result["rows"] if r["model"] == "student"}):
        s, t = rows.get(("student", k)), rows.get(("teacher", k))
        if s and t:
            verdicts.append(f"- {k} step{'s' if k > 1 else ''}: student FD {s['fd']:.3f} vs teacher {t['fd']:.3f} "
                            f"({verdict(s['fd'], t['fd'], True)}), accuracy {s['accuracy']:.3f} vs "
                            f"{t['accuracy']:.3f} ({verdict(s['accuracy'], t['accuracy'], False)}).")
    if verdicts:
        lines += ["At the same step budget:", *verdicts, ""]
    if loss_png:
        lines += ["## Losses", "", "![losses](loss.png)", ""]
    for model, (png, steps) in grids.items():
        lines += [f"## {model.capitalize()} samples (rows: {', '.join(steps)} steps; one column per prompt)", "",
                  f"![{model}]({png})", ""]
    lines += ["Prompts: " + "; ".join(f"`{p}`" for p in prompts), ""]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines))
