"""Per-job report files next to the outputs: loss curve (JSON + PNG), timings, summary."""
from __future__ import annotations

import json
from pathlib import Path


def write_job_report(job_dir: Path, summary: dict, timings: dict, selected: dict | None = None) -> None:
    history = summary.get("history", [])
    (job_dir / "loss_curve.json").write_text(json.dumps(history, indent=1))
    (job_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    rest = {k: v for k, v in summary.items() if k != "history"}
    (job_dir / "summary.json").write_text(json.dumps({**rest, "selected_checkpoint": selected or {}}, indent=2))
    plot_loss_curve(history, job_dir / "loss_curve.png")


def plot_loss_curve(history: list[dict], path: Path) -> bool:
    """A PNG of train and dev loss by step; skipped (False) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
    dev = [h for h in history if h.get("dev_loss") is not None]
    if dev:
        ax.plot([h["step"] for h in dev], [h["dev_loss"] for h in dev], "o-", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (validator metric)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
