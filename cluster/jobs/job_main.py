"""The Ray Job entrypoint for one training job: `python -m cluster.jobs.job_main --task-id ID`.

fetch inputs -> validate the data -> plan hyperparameters and the deadline -> Ray Train fit
-> publish -> hash the published snapshot once -> record. Every phase is timed and written
next to the job's outputs; any failure ends the job with a readable reason.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
import traceback
from pathlib import Path

from transformers import AutoConfig

from cluster.jobs.fetch import FetchLimits, InputError, download_dataset, resolve_model
from cluster.jobs.publish import best_checkpoint, checkpoint_bytes, mark_published, publish
from cluster.jobs.reports import PROGRESS_FILE, PhaseTimer, write_job_report, write_timings
from cluster.plan import Plan
from cluster.planning.capacity import placement, training_stop_s
from cluster.planning.dataset_checks import check_rows
from cluster.planning.knowledge import Knowledge, family_of, learn, local_config
from cluster.planning.model_check import model_dir_problem
from cluster.settings import Settings, load_settings
from cluster.state.metrics import TrainingMonitor, record_final_slack
from cluster.state.store import FAILED, PUBLISHING, QUEUED, RUNNING, SUBMITTED, TERMINAL, Job, JobStore
from trainers.config import TrainConfig
from trainers.formats import tokenize_task
from trainers.instruct_format import DatasetError
from trainers.modeling import load_tokenizer
from trainers.paths import JobPaths
from tuning.priors import default_hparams, param_count_from_config, refine_lr_prior
from tuning.search import SearchPlan, tune_hyperparameters

MIN_SEARCH_S = 60.0  # below this share of the window, no LR search (short demo/test jobs)


def plan(job: Job, settings: Settings, model_dir: Path, train_file: Path, rows: list, run_dir: Path,
         knowledge: Knowledge | None = None) -> TrainConfig:
    """Hyperparameters from the priors (the LR refined by the knowledge base's record, when
    given), the training deadline from the job's deadline."""
    hf_config = AutoConfig.from_pretrained(model_dir)
    n_params = param_count_from_config(hf_config)
    # Tokenise once here, in the driver, with the task type's validator format: bad data fails
    # fast, before any worker starts.
    if job.task_type == "GrpoTask":  # prompts there, reward functions load in the sandbox
        from trainers.grpo import check_grpo_task

        check_grpo_task(rows, job.dataset_type)
    else:
        tokenize_task(job.task_type, rows, job.dataset_type, load_tokenizer(str(model_dir)), hf_config)
    # The capacity plan (cluster.planning.capacity) sets the shape and the window: stop by the planned end
    # so the next queued job starts on time, never after the deadline.
    shape, end = plan_shape(job, settings)
    budget = end - (job.started_at or job.created_at)
    reserve = training_stop_s(job.plan.post_s if job.plan else 0.0, budget)
    hp = default_hparams(n_params, job.task_type, shape.pop("method"))
    lr_prior = starting_lr(hp["lr"], job, model_dir, n_params, hp["method"], knowledge)
    hp["lr"] = lr_prior["lr"]
    extra = {"plan": job.plan.to_dict() if job.plan else None, "lr_prior": lr_prior}
    # the operator's MINER_TRAIN_OPTIONS (cluster/settings.py) over the planner's hyperparameters
    return TrainConfig(model_path=str(model_dir), train_file=str(train_file), dataset_type=job.dataset_type,
                       task_type=job.task_type, run_dir=str(run_dir), run_name=f"ft-{job.task_id}",
                       train_deadline=end - reserve, n_params=n_params, extra=extra,
                       **shape, **{**hp, **settings.train_options})


def starting_lr(recipe_lr: float, job: Job, model_dir: Path, n_params: int, method: str,
                knowledge: Knowledge | None) -> dict:
    """The recipe's LR pulled towards the LRs that published before on this family, size class,
    task type and method. Done here, not only in the search, so that a job too short to search
    still starts from what worked. Keyed as knowledge.learn records runs: the family from the
    model's config.json, size and method from the job's plan."""
    known: list[float] = []
    if knowledge is not None:
        plan_ = job.plan
        known = knowledge.winning_lrs(family_of(local_config(str(model_dir), None)),
                                      (plan_.params if plan_ else 0) or n_params, job.task_type,
                                      (plan_.method if plan_ else "") or method)
    return {"recipe": recipe_lr, "known_lrs": known, "lr": refine_lr_prior(recipe_lr, known)}


def plan_shape(job: Job, settings: Settings) -> tuple[dict, float]:
    """(TrainConfig resources and method, end of the training window) from the job's plan."""
    plan_ = job.plan or Plan()
    where = placement(plan_)
    shape = {"num_workers": int(plan_.workers or settings.num_workers),
             "use_gpu": settings.use_gpu and (plan_.gpus > 0 or not plan_.method),  # unplanned: settings
             "cpus_per_worker": float(plan_.cpus_per_worker or 1.0),
             "accelerator_type": where["accelerator_type"], "label_selector": where["label_selector"],
             "method": "full" if plan_.method == "full" else "lora",
             "zero_stage": 3 if plan_.method == "lora_zero3" else 0}  # trainers/engines.py
    return shape, min(job.deadline, float(plan_.planned_end or job.deadline))


def search_hparams(cfg: TrainConfig, settings: Settings, job_dir: Path) -> TrainConfig:
    """LR (and LoRA rank) from a range test + ASHA on this job's model and data, within
    `settings.search_share` of the training window, around the (already refined) prior cfg.lr.
    Curves and plots go to job_dir (search.json, range_test.*, search_trials.png); the chosen
    values and time spent ride in the config's `search`, so the job record (hparams) keeps them."""
    window_s = cfg.train_deadline - time.time()
    if settings.search_share <= 0 or window_s * settings.search_share < MIN_SEARCH_S:
        return cfg  # a few seconds of search on a few batches is noise: train at the prior
    hf_config = AutoConfig.from_pretrained(cfg.model_path)
    plan_ = SearchPlan(share=settings.search_share, job_gpus=cfg.num_workers if cfg.use_gpu else 0)
    # known_lrs=None: plan() refined cfg.lr with them already; a second pull would count them twice
    tuned, search = tune_hyperparameters(cfg, job_dir, window_s=window_s, prior_lr=cfg.lr, known_lrs=None,
                                         plan=plan_, hidden_size=getattr(hf_config, "hidden_size", None))
    tuned.search = search.brief()
    return tuned


def run_job(task_id: str, settings: Settings) -> int:
    store = JobStore(settings.db_path)
    job = store.get_job(task_id)
    if job is None:
        print(f"unknown task {task_id}", file=sys.stderr)
        return 2
    job_dir = settings.job_dir(task_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    lock = _driver_lock(job_dir, job.deadline)  # held until exit: one driver per job, ever
    if lock is None:
        print(f"task {task_id}: another driver still holds the job at its deadline; nothing to do")
        return 0
    job = store.get_job(task_id)
    if job.status in TERMINAL:
        print(f"task {task_id} is already {job.status}; nothing to do")
        return 0
    if not store.update_job(task_id, only_if_status=(QUEUED, SUBMITTED, RUNNING), status=RUNNING):
        print(f"task {task_id} is {job.status} by another publisher (the watchdog); nothing to do")
        return 0
    attempt = store.start_attempt(task_id)
    if attempt > 1:  # the previous driver died (cluster or control-plane crash): resume
        store.add_fault(task_id, {"kind": "driver_restart", "attempt": attempt})
    timings = PhaseTimer()
    phase = timings.phase
    model_dir, cfg = None, None
    knowledge = Knowledge(store)  # read for the LR prior, written with the outcome

    try:
        rows = _fetch_rows(job, job_dir / "train_data.json", settings)
        phase("download_dataset")
        model_dir = resolve_model(job.model, settings.model_cache_dir, settings.hf_token)
        problem = model_dir_problem(model_dir)
        if problem:
            raise InputError(problem)
        phase("fetch_model")
        cfg = plan(job, settings, model_dir, job_dir / "train_data.json", rows, JobPaths(job_dir).runs, knowledge)
        cfg.label_selector = {**settings.train_labels, **cfg.label_selector}  # operator's labels + planned node
        cfg.progress_file = str(job_dir / PROGRESS_FILE)
        phase("plan")
        cfg = search_hparams(cfg, settings, job_dir)
        phase("search")
        JobPaths(job_dir).hparams.write_text(json.dumps(cfg.to_dict(), indent=2))
        store.update_job(task_id, hparams=cfg.to_dict())
        from trainers.seed_soup import fit_with_soup

        with TrainingMonitor(job_dir / PROGRESS_FILE, task_id, job.task_type, job.deadline):
            outcome = fit_with_soup(cfg, job_dir / "model")
        phase("train")
        for fault in outcome.faults:
            store.add_fault(task_id, fault)
    except (InputError, DatasetError) as exc:
        return _fail(store, job_dir, task_id, str(exc), timings)
    except Exception as exc:
        traceback.print_exc()
        outcome = _fallback_outcome(job_dir, exc)
        if outcome is None:
            learn(knowledge, job, model_dir, cfg, None, f"training failed: {type(exc).__name__}: {exc}")
            return _fail(store, job_dir, task_id, f"training failed: {type(exc).__name__}: {exc}", timings)
        phase("train_failed_fallback")

    if not store.update_job(task_id, only_if_status=(RUNNING,), status=PUBLISHING):
        print(f"[job] the watchdog is publishing {task_id} already; stopping", flush=True)
        return 0
    try:
        repo, model_hash = publish(outcome.model_dir, job, settings)
        phase("publish_and_hash")
    except Exception as exc:
        traceback.print_exc()
        learn(knowledge, job, model_dir, cfg, None, f"publishing failed: {type(exc).__name__}: {exc}")
        return _fail(store, job_dir, task_id, f"publishing failed: {type(exc).__name__}: {exc}", timings,
                     from_states=(PUBLISHING,))
    # The submission is the promise: record it first; reports and learning must never undo it.
    mark_published(store, task_id, repo, model_hash)
    record_final_slack(task_id, job.deadline)
    try:
        write_job_report(job_dir, outcome.summary, timings, selected=outcome.checkpoint_metrics)
        upload = (checkpoint_bytes(outcome.model_dir), timings.durations["publish_and_hash"])  # sizes later reserves
        learn(knowledge, job, model_dir, cfg, outcome.summary, None, upload)
    except Exception:  # a plotting or bookkeeping bug: the model is published either way
        traceback.print_exc()
    print(f"[job] published {repo} hash={model_hash} slack={job.deadline - time.time():.0f} s", flush=True)
    return 0


def _fetch_rows(job: Job, dest: Path, settings: Settings) -> list:
    """Downloads and checks the rows; the file the workers read holds only the usable ones."""
    budget = max(30.0, 0.1 * (job.deadline - time.time()))  # a slow download must not eat the deadline
    rows = download_dataset(job.dataset_url, dest, settings.max_dataset_bytes,
                            limits=FetchLimits(settings.max_dataset_bytes, total_timeout_s=min(900.0, budget)))
    report = check_rows(rows, job.dataset_type)
    if len(report.rows) != len(rows):
        print(f"[job] dropped {report.dropped_null} rows with null/missing fields and {report.dropped_huge} "
              f"oversized rows; {len(report.rows)} left", flush=True)
        dest.write_text(json.dumps(report.rows))
    return report.rows


def _driver_lock(job_dir: Path, deadline: float):
    """An exclusive lock on the job folder. A second driver for the same job (a resubmission
    while an orphan of the old cluster is still exiting) waits for the first to go."""
    f = open(job_dir / ".driver.lock", "w")
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.time() > deadline:
                f.close()
                return None
            time.sleep(1.0)


def _fallback_outcome(job_dir: Path, exc: Exception):
    """Deadlines are sacred: if training died after saving a checkpoint, publish that."""
    from trainers.launch import TrainOutcome, export_checkpoint

    checkpoint = best_checkpoint(JobPaths(job_dir).runs)
    if checkpoint is None:
        return None
    print(f"[job] training failed ({type(exc).__name__}); publishing last checkpoint {checkpoint}", flush=True)
    return TrainOutcome(export_checkpoint(checkpoint, job_dir / "model"), {"fallback_after": f"{type(exc).__name__}: {exc}"}, {})


def _fail(store: JobStore, job_dir: Path, task_id: str, reason: str, timings: PhaseTimer,
          from_states: tuple[str, ...] = (QUEUED, SUBMITTED, RUNNING)) -> int:
    """Fails the job, unless it has moved on meanwhile (the watchdog took it over to publish)."""
    print(f"[job] FAILED: {reason}", file=sys.stderr, flush=True)
    write_timings(job_dir, timings)
    store.update_job(task_id, only_if_status=from_states, status=FAILED, reason=reason)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one miner training job (a Ray Job entrypoint).")
    parser.add_argument("--task-id", required=True)
    args = parser.parse_args(argv)
    return run_job(args.task_id, load_settings())


if __name__ == "__main__":
    sys.exit(main())
