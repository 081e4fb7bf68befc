"""Where a job's files live: one place for the folder layout the trainers, the search and the
cluster all read and write.

    <job_dir>/                       JobPaths
        runs/                        Ray Train storage (TrainConfig.run_dir)
            <run_name>/              RunPaths: one Ray Train run (a rerun with the name resumes)
                checkpoint_*/        Ray's copies of the reported checkpoints
                    metrics.json     the checkpoint's dev metrics (picks the best one)
                    train_state.pt   optimizer + step state a restart resumes from (never published)
                _staging/rank<r>/step_<n>/   where each rank writes a checkpoint before reporting it
        hparams.json  search.json  range_test.json|png  search_trials.png  asha/trials/
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_METRICS = "metrics.json"  # written beside each checkpoint's weights
TRAIN_STATE = "train_state.pt"       # the resume state inside a checkpoint; never exported
CHECKPOINT_GLOB = "checkpoint_*"     # Ray Train's checkpoint folders inside a run
# what export leaves out of a checkpoint: the rest is the publishable model
NOT_PUBLISHED = (TRAIN_STATE, CHECKPOINT_METRICS)


def best_by_dev(candidates: list, dev_loss, order):
    """The one checkpoint choice: the candidate with the lowest dev loss, the latest (by `order`)
    among equals; the latest when none has a dev loss (no dev split); None when there is none."""
    if not candidates:
        return None
    scored = [c for c in candidates if dev_loss(c) is not None]
    if scored:
        return min(scored, key=lambda c: (dev_loss(c), -order(c)))
    return max(candidates, key=order)


@dataclass(frozen=True)
class RunPaths:
    """One Ray Train run: `storage` is its storage_path (TrainConfig.run_dir), `name` its name."""
    storage: Path
    name: str

    @classmethod
    def of(cls, cfg) -> RunPaths:
        return cls(Path(cfg.run_dir), cfg.run_name)

    @property
    def root(self) -> Path:
        return self.storage / self.name

    @property
    def staging(self) -> Path:
        return self.root / "_staging"

    def rank_staging(self, rank: int) -> Path:
        return self.staging / f"rank{rank}"

    def step_dir(self, rank: int, step: int) -> Path:
        return self.rank_staging(rank) / f"step_{step:07d}"


@dataclass(frozen=True)
class JobPaths:
    """One job's folder (the cluster's settings.job_dir(task_id), a tournament's work folder)."""
    job_dir: Path

    @property
    def runs(self) -> Path:
        return self.job_dir / "runs"

    @property
    def hparams(self) -> Path:
        return self.job_dir / "hparams.json"

    @property
    def search(self) -> Path:
        return self.job_dir / "search.json"

    @property
    def search_trials_plot(self) -> Path:
        return self.job_dir / "search_trials.png"

    @property
    def range_test(self) -> Path:
        return self.job_dir / "range_test.json"

    @property
    def range_test_plot(self) -> Path:
        return self.job_dir / "range_test.png"

    @property
    def asha(self) -> Path:
        return self.job_dir / "asha"

    @property
    def asha_trials(self) -> Path:
        return self.asha / "trials"
