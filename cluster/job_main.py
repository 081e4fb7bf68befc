"""The Ray Job entrypoint for one training job: `python -m cluster.job_main --task-id ID`.

fetch inputs -> validate the data -> plan hyperparameters and the deadline -> Ray Train fit
-> publish -> hash the published snapshot once -> record. Every phase is timed and written
next to the job's outputs; any failure ends the job with a readable reason.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from transformers import AutoConfig

from trainers.config import TrainConfig
from trainers.instruct_format import DatasetError, eval_sequence_length, tokenize_rows
from trainers.modeling import load_tokenizer
from tuning.priors import default_hparams, param_count_from_config
from tuning.search import SearchPlan, tune_hyperparameters

from .fetch import InputError, download_dataset, resolve_model
from .publish import latest_checkpoint, publish
from .reports import write_job_report
from .settings import Settings, load_settings
from .store import ACTIVE, FAILED, PUBLISHING, RUNNING, TERMINAL, Job, JobStore

# Seconds kept back from the deadline for saving, uploading and hashing (plus a share of the budget).
PUBLISH_RESERVE_S = 20.0
PUBLISH_RESERVE_FRACTION = 0.05


def plan(job: Job, settings: Settings, model_dir: Path, train_file: Path, rows: list, run_dir: Path) -> TrainConfig:
    """Hyperparameters from the priors, the training deadline from the job's deadline."""
    hf_config = AutoConfig.from_pretrained(model_dir)
    n_params = param_count_from_config(hf_config)
    # Tokenise once here, in the driver: bad data fails fast, before any worker starts.
    tokenize_rows(rows, job.dataset_type, load_tokenizer(str(model_dir)),
                  eval_sequence_length(getattr(hf_config, "max_position_embeddings", None)))
    budget = job.deadline - job.created_at
    reserve = PUBLISH_RESERVE_S + PUBLISH_RESERVE_FRACTION * budget
    hp = default_hparams(n_params, job.task_type)
    return TrainConfig(model_path=str(model_dir), train_file=str(train_file), dataset_type=job.dataset_type,
                       task_type=job.task_type, run_dir=str(run_dir), run_name=f"ft-{job.task_id}",
                       train_deadline=job.deadline - reserve, num_workers=settings.num_workers,
                       use_gpu=settings.use_gpu, extra={"n_params": n_params}, **hp)


def search_hparams(cfg: TrainConfig, job: Job, settings: Settings, job_dir: Path) -> TrainConfig:
    """LR (and LoRA rank) from a range test + ASHA on this job's model and data, within
    `settings.search_share` of the training window; the prior refined by the knowledge base.
    Curves and plots go to job_dir (search.json, range_test.*, search_trials.png); the chosen
    values and time spent ride in the config's `extra`, so the job record (hparams) keeps them."""
    if settings.search_share <= 0:
        return cfg
    hf_config = AutoConfig.from_pretrained(cfg.model_path)
    plan_ = SearchPlan(share=settings.search_share, job_gpus=cfg.num_workers if cfg.use_gpu else 0)
    known = _known_lrs(hf_config.model_type, cfg.extra.get("n_params", 0), job.task_type, cfg.method)
    tuned, search = tune_hyperparameters(cfg, job_dir, window_s=cfg.train_deadline - time.time(), prior_lr=cfg.lr,
                                         known_lrs=known, plan=plan_, hidden_size=getattr(hf_config, "hidden_size", None))
    tuned.extra = {**tuned.extra, "search": search.brief()}
    return tuned


def _known_lrs(family: str, n_params: int, task_type: str, method: str) -> list[float]:
    """LRs that won before on this family/size/task, from cluster/knowledge.py once it exists."""
    try:
        from . import knowledge
    except ImportError:
        return []
    lookup = getattr(knowledge, "winning_lrs", None)
    return list(lookup(family=family, n_params=n_params, task_type=task_type, method=method) or []) if lookup else []


def run_job(task_id: str, settings: Settings) -> int:
    store = JobStore(settings.db_path)
    job = store.get_job(task_id)
    if job is None:
        print(f"unknown task {task_id}", file=sys.stderr)
        return 2
    if job.status in TERMINAL:
        print(f"task {task_id} is already {job.status}; nothing to do")
        return 0
    store.update_job(task_id, only_if_status=ACTIVE, status=RUNNING)
    job_dir = settings.job_dir(task_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.time()

    def phase(name: str) -> None:
        nonlocal t
        timings[name] = round(time.time() - t, 2)
        t = time.time()
        print(f"[job] {name} done in {timings[name]} s", flush=True)

    try:
        rows = download_dataset(job.dataset_url, job_dir / "train_data.json", settings.max_dataset_bytes)
        phase("download_dataset")
        model_dir = resolve_model(job.model, settings.model_cache_dir, settings.hf_token)
        phase("fetch_model")
        cfg = plan(job, settings, model_dir, job_dir / "train_data.json", rows, job_dir / "runs")
        phase("plan")
        cfg = search_hparams(cfg, job, settings, job_dir)
        phase("search")
        (job_dir / "hparams.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        store.update_job(task_id, hparams=cfg.to_dict())
        from trainers.launch import fit

        outcome = fit(cfg, job_dir / "model")
        phase("train")
    except (InputError, DatasetError) as exc:
        return _fail(store, job_dir, task_id, str(exc), timings)
    except Exception as exc:
        traceback.print_exc()
        outcome = _fallback_outcome(job_dir, exc)
        if outcome is None:
            return _fail(store, job_dir, task_id, f"training failed: {type(exc).__name__}: {exc}", timings)
        phase("train_failed_fallback")

    store.update_job(task_id, status=PUBLISHING)
    try:
        repo, model_hash = publish(outcome.model_dir, job, settings)
        phase("publish_and_hash")
    except Exception as exc:
        traceback.print_exc()
        return _fail(store, job_dir, task_id, f"publishing failed: {type(exc).__name__}: {exc}", timings)
    write_job_report(job_dir, outcome.summary, timings, selected=outcome.checkpoint_metrics)
    store.update_job(task_id, status="published", repo=repo, model_hash=model_hash, reason=None)
    print(f"[job] published {repo} hash={model_hash} slack={job.deadline - time.time():.0f} s", flush=True)
    return 0


def _fallback_outcome(job_dir: Path, exc: Exception):
    """Deadlines are sacred: if training died after saving a checkpoint, publish that."""
    from trainers.launch import TrainOutcome, export_checkpoint

    checkpoint = latest_checkpoint(job_dir / "runs")
    if checkpoint is None:
        return None
    print(f"[job] training failed ({type(exc).__name__}); publishing last checkpoint {checkpoint}", flush=True)
    return TrainOutcome(export_checkpoint(checkpoint, job_dir / "model"), {"fallback_after": f"{type(exc).__name__}: {exc}"}, {})


def _fail(store: JobStore, job_dir: Path, task_id: str, reason: str, timings: dict) -> int:
    print(f"[job] FAILED: {reason}", file=sys.stderr, flush=True)
    (job_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    store.update_job(task_id, only_if_status=ACTIVE, status=FAILED, reason=reason)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one miner training job (a Ray Job entrypoint).")
    parser.add_argument("--task-id", required=True)
    args = parser.parse_args(argv)
    return run_job(args.task_id, load_settings())


if __name__ == "__main__":
    sys.exit(main())
