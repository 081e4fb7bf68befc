"""PNG plots of the search, written next to the job's outputs; skipped (False) without matplotlib."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path) -> bool:
    """Lays out, writes and closes a figure (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_range_test(result, path: Path) -> bool:
    plt = pyplot()
    if plt is None or not result.lrs:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result.lrs, result.losses, lw=0.8, alpha=0.5, label="loss")
    ax.plot(result.lrs, result.smoothed, lw=1.5, label="smoothed")
    ax.axvline(result.suggestion, color="g", ls="--", label=f"suggestion {result.suggestion:.2e}")
    ax.axvline(result.lr_at_min, color="r", ls=":", label=f"min {result.lr_at_min:.2e}")
    finite = [v for v in result.smoothed if v == v and v != float("inf")]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 3 * min(finite)) * 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (validator metric)")
    ax.set_title("LR range test")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_trials(trials: list[dict], chosen: dict, path: Path) -> bool:
    """Dev loss by step for every trial; early-stopped trials dashed, the chosen one thick."""
    if not trials:
        return False
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        curve = [c for c in t["curve"] if c.get("dev_loss") is not None]
        if not curve:
            continue
        is_chosen = t["trial_id"] == chosen.get("trial_id")
        label = f"lr {t['config']['lr']:.1e}" + (f" r{t['config']['lora_r']}" if t["config"].get("lora_r") else "")
        ax.plot([c["step"] for c in curve], [c["dev_loss"] for c in curve], "o-" if is_chosen else ".-",
                ls="--" if t["stopped_early"] else "-", lw=2.5 if is_chosen else 1, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("dev loss (validator metric)")
    ax.set_title("ASHA trials (dashed: stopped early)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
