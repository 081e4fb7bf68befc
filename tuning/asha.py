"""ASHA over the task type's search space (space.py) with Ray Tune, around the range test's LR.

Each trial is a short real training run of the job's own recipe (trainers.launch.recipe) in a
TorchTrainer: the same base weights, the same batches in the same order (the recipe's
deterministic batching: trial k's first n steps see exactly the final run's first n batches),
a cosine schedule compressed into `trial_steps`, and a dev evaluation with the validator's
metric at each of `rungs` evenly spaced points. Each evaluation is one ASHA iteration, so ASHA
compares trials on dev loss (not training loss) at equal step counts.

Ray 2.60 / Train V2: `Tuner(TorchTrainer)` fails, so each trial is a function trainable that
builds the TorchTrainer with Tune's report callback and calls fit() (ray-notes.md §3.1).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainers.config import TrainConfig
from trainers.paths import JobPaths

from .space import apply_choice, search_space


@dataclass
class AshaConfig:
    trials: int = 8                  # Tune num_samples (the first ones are the space's first points)
    rungs: int = 4                   # dev evaluations per full trial = ASHA max_t
    grace: int = 1                   # ASHA grace_period, in evaluations
    reduction_factor: int = 3        # keep the best third at each rung
    trial_steps: int = 32            # optimizer steps of a trial that is never stopped
    concurrent: int = 1              # trials at once (see max_concurrent)
    time_budget_s: float | None = None
    trial_workers: int = 1           # Train workers (one GPU each on GPU) per trial
    seed: int = 0
    extra_points: list[dict] = field(default_factory=list)  # also evaluated first (e.g. known LRs)
    search_rank: bool = True         # False: keep the config's LoRA rank, search the LR only


@dataclass
class AshaResult:
    chosen: dict                     # {"trial_id", "config", "dev_loss", "rung"}
    trials: list[dict]               # each: trial_id, config, curve, iterations, stopped_early, error
    seconds: float
    trial_steps_total: int           # optimizer steps actually run, all trials together
    dev_evals_total: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def max_concurrent(job_gpus: int, gpus_per_trial: int, cpu_trials: int = 1) -> int:
    """Trials at once: a Train run starts only when all its workers fit, so never ask for more
    than the job holds (ray-notes §3.3); on CPU, `cpu_trials` (1-2 on a small box)."""
    if job_gpus > 0:
        return max(1, job_gpus // max(1, gpus_per_trial))
    return max(1, min(2, cpu_trials))


def trial_base(cfg: TrainConfig, asha: AshaConfig, batches_per_epoch: int, storage: Path) -> dict:
    """The job's config turned into a short, checkpoint-free, deadline-free trial."""
    per_worker = max(1, batches_per_epoch // asha.trial_workers)
    base = cfg.to_dict()
    base.update(epochs=(asha.trial_steps + 0.5) * cfg.grad_accum / per_worker, saves=asha.rungs,
                train_deadline=0.0, num_workers=asha.trial_workers, run_dir=str(storage),
                search_trial=True)
    return base


def _trial(config: dict, base: dict, storage: str) -> None:
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.launch import recipe, scaling_config

    trial_cfg = TrainConfig(**apply_choice(base, config))
    trial_cfg.run_name = f"trial-{tune.get_context().get_trial_id()}"
    TorchTrainer(recipe(trial_cfg.task_type), train_loop_config=trial_cfg.to_dict(),
                 scaling_config=scaling_config(trial_cfg),
                 run_config=ray.train.RunConfig(name=trial_cfg.run_name, storage_path=storage,
                                                callbacks=[TuneReportCallback()])).fit()


def run_asha(cfg: TrainConfig, out_dir: Path, centre_lr: float, asha: AshaConfig, *, batches_per_epoch: int,
             hidden_size: int | None = None) -> AshaResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if asha.trials < 1 or asha.rungs < 1 or asha.trial_steps < asha.rungs:
        raise ValueError(f"bad ASHA settings: {asha}")
    paths = JobPaths(Path(out_dir).resolve())
    storage, trials_dir = paths.asha, paths.asha_trials
    space, first = search_space(cfg.task_type, cfg.to_dict(), centre_lr, hidden_size)
    first = first + [{**first[0], **p} for p in asha.extra_points]
    if not asha.search_rank:
        space.pop("lora_r", None)
        first = [{k: v for k, v in p.items() if k != "lora_r"} for p in first]
    base = trial_base(cfg, asha, batches_per_epoch, trials_dir)
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, storage=str(trials_dir)),
                                    {"CPU": 0.01})
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=asha.rungs,
                              grace_period=min(asha.grace, asha.rungs), reduction_factor=asha.reduction_factor)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(
            metric="dev_loss", mode="min", scheduler=scheduler, num_samples=asha.trials,
            # max_concurrent on the generator: Tune ignores TuneConfig.max_concurrent_trials
            # when search_alg is a generator instance (it logs a warning and runs them all).
            search_alg=BasicVariantGenerator(points_to_evaluate=first[:asha.trials], random_state=asha.seed,
                                             max_concurrent=asha.concurrent),
            time_budget_s=asha.time_budget_s),
        run_config=tune.RunConfig(name="asha", storage_path=str(storage), verbose=0))
    t0 = time.time()
    grid = tuner.fit()
    seconds = time.time() - t0
    records = [_trial_record(r, asha.rungs) for r in grid]
    trials = [t for t in records if t["curve"] or t["error"]]   # the rest never reported (time budget)
    chosen = choose(trials)
    return AshaResult(chosen=chosen, trials=trials, seconds=round(seconds, 2),
                      trial_steps_total=sum(t["steps"] for t in trials),
                      dev_evals_total=sum(t["iterations"] for t in trials),
                      extra={"unscored": len(records) - len(trials), "centre_lr": centre_lr, "settings": asdict(asha),
                             "space": {k: str(v) for k, v in space.items()}})


def _trial_record(result, rungs: int) -> dict:
    df = result.metrics_dataframe if result.path and (Path(result.path) / "progress.csv").exists() else None
    curve = []
    if df is not None and len(df):
        keep = [c for c in ("training_iteration", "step", "dev_loss", "loss", "lr", "elapsed_s") if c in df.columns]
        curve = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                 for row in df[keep].to_dict("records")]
    iterations = len(curve)
    return {"trial_id": (result.metrics or {}).get("trial_id") or Path(str(result.path)).name,
            # a trial the time budget stopped before its first report has neither config nor metrics
            "config": dict(result.config or {}), "curve": curve, "iterations": iterations,
            "steps": int(curve[-1]["step"]) if curve and curve[-1].get("step") is not None else 0,
            "stopped_early": result.error is None and 0 < iterations < rungs,
            "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:300]}


def choose(trials: list[dict]) -> dict:
    """The lowest dev loss at the deepest evaluation any trial reached: trials are compared at
    equal step counts (a stopped trial's early loss never competes with a finished one's)."""
    scored = [t for t in trials if t["curve"] and t["curve"][-1].get("dev_loss") is not None]
    if not scored:
        return {}
    deepest = max(t["iterations"] for t in scored)
    best = min((t for t in scored if t["iterations"] == deepest), key=lambda t: t["curve"][-1]["dev_loss"])
    return {"trial_id": best["trial_id"], "config": best["config"], "dev_loss": best["curve"][-1]["dev_loss"],
            "rung": deepest}
