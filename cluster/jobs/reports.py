"""Per-job report files next to the outputs (`$MINER_STATE_DIR/jobs/<task_id>/`).

- `loss_curve.json` + `loss_curve.png`: train loss, dev loss (the validator's metric) and the LR
  schedule by optimizer step;
- `timings.json` (seconds per phase), `timeline.json` (when each phase started and ended) and
  `timings.png`;
- `summary.json`: the recipe's summary and the checkpoint that was selected;
- `report.json`: the index: chosen hyperparameters, timings, and links to the LR range-test
  plot/JSON when the tuning step wrote them, plus every other file above.
`miner job <task_id>` tells a job's story from these files and the store.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainers.paths import JobPaths
from tuning.plots import pyplot, save_figure

PROGRESS_FILE = "progress.json"  # written live by the trainer's rank 0 (trainers/progress.py)
# Files the tuning step (LR range test) may leave in the job folder; linked when present.
LR_RANGE_TEST_GLOBS = ("lr_range*.png", "lr_range*.json", "lr_find*.png", "lr_find*.json",
                       "tuning/lr_range*.png", "tuning/lr_range*.json")


@dataclass
class PhaseTimer:
    """Times the job's phases: `phase(name)` closes the phase that ran since the last call."""
    started_at: float = field(default_factory=time.time)
    durations: dict = field(default_factory=dict)
    timeline: list = field(default_factory=list)

    def __post_init__(self):
        self._t = self.started_at

    def phase(self, name: str) -> None:
        now = time.time()
        self.durations[name] = round(now - self._t, 2)
        self.timeline.append({"phase": name, "start": round(self._t, 3), "end": round(now, 3)})
        self._t = now
        print(f"[job] {name} done in {self.durations[name]} s", flush=True)


def write_job_report(job_dir: Path, summary: dict, timings: dict | PhaseTimer, selected: dict | None = None) -> dict:
    """Writes every report file; returns report.json's content."""
    history = summary.get("history", [])
    (job_dir / "loss_curve.json").write_text(json.dumps(history, indent=1))
    rest = {k: v for k, v in summary.items() if k != "history"}
    (job_dir / "summary.json").write_text(json.dumps({**rest, "selected_checkpoint": selected or {}}, indent=2))
    plot_loss_curve(history, job_dir / "loss_curve.png")
    return write_timings(job_dir, timings)


def write_timings(job_dir: Path, timings: dict | PhaseTimer) -> dict:
    """timings.json, timeline.json, timings.png and report.json: also for a job that failed early."""
    durations = timings.durations if isinstance(timings, PhaseTimer) else dict(timings)
    (job_dir / "timings.json").write_text(json.dumps(durations, indent=2))
    if isinstance(timings, PhaseTimer):
        (job_dir / "timeline.json").write_text(json.dumps(timings.timeline, indent=1))
    plot_timings(durations, job_dir / "timings.png")
    return write_index(job_dir)


def write_index(job_dir: Path) -> dict:
    lr_range = sorted(str(p.relative_to(job_dir)) for g in LR_RANGE_TEST_GLOBS for p in job_dir.glob(g))
    report = {
        "hyperparameters": _read_json(JobPaths(job_dir).hparams),
        "timings_s": _read_json(job_dir / "timings.json"),
        "selected_checkpoint": (_read_json(job_dir / "summary.json") or {}).get("selected_checkpoint"),
        "lr_range_test": lr_range,
        "files": sorted(p.name for p in job_dir.iterdir()
                        if p.suffix in (".png", ".json") and p.name != "train_data.json"),
    }
    (job_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plot_loss_curve(history: list[dict], path: Path) -> bool:
    """Train and dev loss by step, with the LR schedule below; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None or not history:
        return False
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="train loss", lw=1)
    dev = [h for h in history if h.get("dev_loss") is not None]
    if dev:
        ax.plot([h["step"] for h in dev], [h["dev_loss"] for h in dev], "o-", label="dev loss")
    ax.set_ylabel("loss (validator metric)")
    ax.legend()
    ax.grid(alpha=0.3)
    if any("lr" in h for h in history):
        lr_ax.plot(steps, [h.get("lr", 0.0) for h in history], color="tab:green", lw=1)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_timings(durations: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None or not durations:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(durations)))
    names = list(durations)[::-1]
    ax.barh(names, [durations[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(durations[n], i, f" {durations[n]:.1f} s", va="center")
    ax.set_xlabel("seconds")
    ax.set_title("job phases")
    ax.margins(x=0.2)
    return save_figure(fig, path)
