"""One entry point: `fit(TrainConfig)` runs the task's recipe in a Ray Train TorchTrainer and
returns the best checkpoint by dev loss, with the run's history."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from .config import TrainConfig
from .fault_log import FaultLog
from .paths import NOT_PUBLISHED, RunPaths, best_by_dev

# Worker-group restarts Ray Train makes on its own (worker process died, node lost) before
# fit() gives up; each resumes from the run's last checkpoint.
MAX_WORKER_FAILURES = 2

# task type -> the train_loop_per_worker that trains it (Instruct and Chat differ only in rendering)
RECIPES = {
    "InstructTextTask": "trainers.loop:train_loop_per_worker",
    "ChatTask": "trainers.loop:train_loop_per_worker",
    "DpoTask": "trainers.dpo:train_loop_per_worker",
    "GrpoTask": "trainers.grpo:train_loop_per_worker",
}


@dataclass
class TrainOutcome:
    model_dir: Path          # the selected weights, ready to publish
    summary: dict            # the recipe's return value (history, steps, best, ...)
    checkpoint_metrics: dict
    faults: list = field(default_factory=list)  # worker failures survived, with the time each cost


def recipe(task_type: str):
    if task_type not in RECIPES:
        raise ValueError(f"no trainer for task type {task_type!r} yet (have: {sorted(RECIPES)})")
    module, fn = RECIPES[task_type].split(":")
    import importlib

    return getattr(importlib.import_module(module), fn)


def scaling_config(cfg: TrainConfig) -> ScalingConfig:
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
                         placement_strategy="STRICT_PACK" if cfg.num_workers <= 8 else "PACK",
                         accelerator_type=cfg.accelerator_type, label_selector=cfg.label_selector or None)


def fit(cfg: TrainConfig, out_dir: Path) -> TrainOutcome:
    """Runs (or, after a crash with the same run_name and run_dir, resumes) the recipe."""
    fault_log = FaultLog(RunPaths.of(cfg).root)
    trainer = TorchTrainer(
        recipe(cfg.task_type),
        train_loop_config=cfg.to_dict(),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=cfg.run_dir,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="dev_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
            callbacks=[fault_log] if cfg.num_workers > 0 else []),
    )
    result = trainer.fit()
    best = latest_good_checkpoint(result)
    if best is None:
        raise RuntimeError("training produced no checkpoint")
    checkpoint, metrics = best
    with checkpoint.as_directory() as d:
        out_dir = export_checkpoint(Path(d), Path(out_dir))
    shutil.rmtree(RunPaths.of(cfg).staging, ignore_errors=True)
    return TrainOutcome(out_dir, result.return_value or {}, metrics, fault_log.read())


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, fix=None) -> Path:
    """The publishable part of a checkpoint (weights, configs, tokenizer), without the
    optimizer/resume state, into `out_dir`. Copied beside it (`fix`, if given, edits the copy)
    and swapped into place in one rename: an uploader that looks at `out_dir` at any moment, or a
    kill at any moment, finds either the old complete model or the new one, never half of one."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir, tmp, ignore=shutil.ignore_patterns(*NOT_PUBLISHED))
    if fix is not None:
        fix(tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def replace_dir(new: Path, dest: Path) -> None:
    """`new` takes `dest`'s place. Linux's renameat2(RENAME_EXCHANGE) swaps the two atomically;
    elsewhere two renames leave `dest` missing for a moment (never half-written)."""
    if dest.exists() and _exchange(new, dest):
        shutil.rmtree(new)  # it now holds the previous model
        return
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    import ctypes
    import os

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def latest_good_checkpoint(result):
    """The checkpoint with the lowest dev loss (the latest one when there is no dev split)."""
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if m]
    best = best_by_dev(ranked, lambda cm: cm[1].get("dev_loss"), lambda cm: cm[1].get("step", 0))
    if best:
        return best
    return (result.checkpoint, result.metrics or {}) if result.checkpoint else None
