"""One entry point, `tune_hyperparameters`: LR range test, then ASHA, inside a fixed share of
the job's training window; returns the TrainConfig to train with and a record of the search.

Budget: the search may use `share` (default 20%, training-recipes.md §1.6) of the window it is
given. The range test gets at most `range_test_share` of that, ASHA gets Tune's `time_budget_s`
= what is left minus a teardown margin (Tune stops running trials at the budget; tearing down
their Train runs takes a few seconds). ASHA is skipped when the rest cannot fit two trials'
first evaluations; the range test's suggestion (or the prior) is used then. Any failure of the
search falls back the same way: the job always trains.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trainers.config import TrainConfig
from trainers.paths import JobPaths

from .asha import AshaConfig, max_concurrent, run_asha
from .plots import plot_trials
from .priors import refine_lr_prior
from .range_test import RangeTestConfig, run_range_test
from .space import apply_choice


@dataclass
class SearchPlan:
    share: float = 0.2                 # of the training window
    range_test: RangeTestConfig = field(default_factory=RangeTestConfig)
    range_test_share: float = 0.3      # of the search budget, at most
    asha: AshaConfig = field(default_factory=AshaConfig)
    trial_fraction: float = 0.25       # a full trial ~ this share of the final run's planned steps
    min_trial_steps: int = 8
    max_trial_steps: int = 400
    trial_startup_s: float = 20.0      # fixed cost of one trial (Train worker start, model load)
    teardown_margin_s: float = 10.0    # kept back for Tune to stop trials at its time budget and
    teardown_fraction: float = 0.2     # read results (~10 s measured on a loaded 2-core box), + this share
    job_gpus: int = 0                  # GPUs the job holds (0: CPU)
    cpu_trials: int = 1                # concurrent trials on CPU

    def __post_init__(self):
        if not 0 <= self.share < 1:
            raise ValueError(f"search share must be in [0, 1), got {self.share}")


@dataclass
class SearchOutcome:
    chosen: dict                       # the values trained with: lr (+ lora_r, lora_alpha)
    source: str                        # "asha" | "range_test" | "prior"
    prior_lr: float                    # after the knowledge-base refinement
    recipe_prior_lr: float
    budget_s: float
    seconds: float
    window_s: float
    range_test: dict | None = None
    asha: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def share_used(self) -> float:
        return self.seconds / self.window_s if self.window_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "share_used": round(self.share_used, 4)}

    def brief(self) -> dict:
        """For the job record and the knowledge base: what was chosen, from what, at what cost."""
        asha = self.asha or {}
        return {"chosen": self.chosen, "source": self.source, "prior_lr": self.prior_lr,
                "recipe_prior_lr": self.recipe_prior_lr, "range_test_lr": (self.range_test or {}).get("suggestion"),
                "trials": len(asha.get("trials", [])), "stopped_early": sum(t["stopped_early"] for t in asha.get("trials", [])),
                "seconds": self.seconds, "budget_s": self.budget_s, "share_used": round(self.share_used, 4),
                "notes": self.notes}


def plan_trial_steps(plan: SearchPlan, cfg: TrainConfig, batches_per_epoch: int, step_s: float, window_s: float) -> int:
    """A full trial is `trial_fraction` of the steps the final run will really take: its planned
    epochs, capped by what fits in the window left after the search."""
    planned = cfg.epochs * batches_per_epoch / max(1, cfg.grad_accum * cfg.num_workers)
    fits = window_s * (1 - plan.share) / max(step_s, 1e-6)
    steps = int(plan.trial_fraction * min(planned, fits))
    return max(plan.min_trial_steps, plan.asha.rungs, min(plan.max_trial_steps, steps))


def tune_hyperparameters(cfg: TrainConfig, out_dir: Path, window_s: float, prior_lr: float,
                         known_lrs: list[float] | None = None, plan: SearchPlan | None = None,
                         hidden_size: int | None = None) -> tuple[TrainConfig, SearchOutcome]:
    """`prior_lr` is the recipe prior (priors.py); `known_lrs` the knowledge base's winning LRs
    for this family/size/task (looked up by the caller). Writes search.json (+ plots) to out_dir."""
    plan = plan or SearchPlan()
    t0 = time.time()
    budget = plan.share * window_s
    end = t0 + budget
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prior = refine_lr_prior(prior_lr, known_lrs)
    outcome = SearchOutcome(chosen={"lr": prior}, source="prior", prior_lr=prior, recipe_prior_lr=prior_lr,
                            budget_s=round(budget, 2), seconds=0.0, window_s=round(window_s, 2))
    rt = None
    if budget <= 0:
        outcome.notes.append("no search budget: training at the prior")
    else:
        try:
            # The range test's allowance counts from now: loading the model and data is in it.
            rt_cfg = replace(plan.range_test, stop_at=t0 + plan.range_test_share * budget)
            rt = _range_test(cfg, out_dir, prior, rt_cfg)
            outcome.range_test = rt.to_dict()
            doubt = inconclusive(rt)
            if doubt:
                outcome.notes.append(f"range test inconclusive ({doubt}): kept the prior")
            else:
                outcome.chosen, outcome.source = {"lr": rt.suggestion}, "range_test"
        except Exception as exc:  # the job must train even if the search cannot
            traceback.print_exc()
            outcome.notes.append(f"range test failed: {type(exc).__name__}: {exc}")
    if rt is not None:
        _maybe_asha(cfg, out_dir, plan, rt, window_s, end, hidden_size, outcome)
    outcome.seconds = round(time.time() - t0, 2)
    JobPaths(out_dir).search.write_text(json.dumps(outcome.to_dict(), indent=1, default=str))
    tuned = TrainConfig(**apply_choice(cfg.to_dict(), outcome.chosen))
    print(f"[search] {outcome.source}: {outcome.chosen} in {outcome.seconds:.1f} s "
          f"({100 * outcome.share_used:.1f}% of {window_s:.0f} s; budget {100 * plan.share:.0f}%)", flush=True)
    return tuned, outcome


MIN_CURVE_POINTS = 8  # fewer LRs than this do not show where the loss turns up


def inconclusive(rt) -> str | None:
    """Why a range-test curve cannot place the LR, else None. On a busy or slow machine the test
    can run out of time after a handful of LRs; its minimum is then just the last LR tried, and
    min/10 of that trained a 10-minute job at 7e-7 (1000x under the prior) in a real run."""
    if len(rt.lrs) < MIN_CURVE_POINTS:
        return f"{len(rt.lrs)} LRs tried, need {MIN_CURVE_POINTS}"
    if rt.stopped_by == "time" and rt.lr_at_min == rt.lrs[-1]:
        return "stopped by time while the loss was still falling"
    return None


def _range_test(cfg: TrainConfig, out_dir: Path, prior: float, rt_cfg: RangeTestConfig):
    """On GPU jobs the driver holds no GPU: run the test as a one-GPU Ray task."""
    if not cfg.use_gpu:
        return run_range_test(cfg, out_dir, prior, rt_cfg)
    import ray

    task = ray.remote(num_gpus=1, num_cpus=cfg.cpus_per_worker)(run_range_test)
    return ray.get(task.remote(cfg, out_dir, prior, rt_cfg))


def _maybe_asha(cfg, out_dir, plan, rt, window_s, end, hidden_size, outcome) -> None:
    step_s = rt.seconds / max(1, len(rt.lrs))
    steps = plan_trial_steps(plan, cfg, rt.batches_per_epoch, step_s, window_s)
    first_eval_s = plan.trial_startup_s + 1.5 * step_s * steps / plan.asha.rungs
    # Kept back: Tune stops trials at its budget, then tears down their Train runs and reads
    # the results (seconds, more on a loaded machine).
    time_left = (end - time.time()) * (1 - plan.teardown_fraction) - plan.teardown_margin_s
    if time_left < 2 * first_eval_s:
        outcome.notes.append(f"ASHA skipped: {time_left:.0f} s left, a trial's first evaluation needs ~{first_eval_s:.0f} s")
        return
    gpus_per_trial = plan.asha.trial_workers if cfg.use_gpu else 0
    asha = replace(plan.asha, trial_steps=steps, time_budget_s=time_left, trial_workers=plan.asha.trial_workers,
                   concurrent=max_concurrent(plan.job_gpus if cfg.use_gpu else 0, gpus_per_trial, plan.cpu_trials))
    try:
        result = run_asha(cfg, out_dir, outcome.chosen["lr"], asha, batches_per_epoch=rt.batches_per_epoch,
                          hidden_size=hidden_size)
    except Exception as exc:
        traceback.print_exc()
        outcome.notes.append(f"ASHA failed: {type(exc).__name__}: {exc}")
        return
    outcome.asha = result.to_dict()
    plot_trials(result.trials, result.chosen, JobPaths(Path(out_dir)).search_trials_plot)
    if result.chosen:
        outcome.chosen = {k: v for k, v in result.chosen["config"].items() if k in ("lr", "lora_r")}
        if "lora_r" in outcome.chosen:
            outcome.chosen["lora_alpha"] = 2 * int(outcome.chosen["lora_r"])
        outcome.source = "asha"
    else:
        outcome.notes.append(f"ASHA produced no scored trial: keeping the {outcome.source} LR")
