"""Prefetch: the dataset (and HF base model) of the jobs queued next download while other jobs
train, so that those jobs start training instead of waiting on the network.

The control plane's reconcile loop calls the prefetcher for the next few queued jobs (in the
order the deadline-first queue will start them). Downloads run on one background thread; each
job is fetched at most once; nothing is parsed here (a 2 GB dataset is the job's business,
not the control plane's). A failure is only logged: the job's own start downloads again and
fails with a readable reason if the input really is bad. Files land whole or not at all (an
atomic rename), where `fetch.download_dataset` and `fetch.resolve_model` look first.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from cluster.jobs.fetch import FetchLimits, fetch_file, prefetched_path, resolve_model
from cluster.settings import Settings
from cluster.state.store import Job

log = logging.getLogger("miner.prefetch")
DATASET_FILE = "train_data.json"     # the name job_main downloads a job's dataset to
PREFETCH_TIMEOUT_S = 900.0
MAX_REMEMBERED = 1000                # finished prefetches remembered (idempotence), oldest dropped


class Prefetcher:
    """`prefetcher(job)`: the hook ControlPlane calls; returns the job's (single) Future."""

    def __init__(self, settings: Settings, threads: int = 1):
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prefetch")
        self._lock = threading.Lock()
        self.jobs: dict[str, Future] = {}

    def __call__(self, job: Job) -> Future:
        with self._lock:
            if job.task_id not in self.jobs:
                self._forget_oldest()
                self.jobs[job.task_id] = self._pool.submit(self._fetch, job)
            return self.jobs[job.task_id]

    def wait(self, timeout: float | None = None) -> None:
        """Waits for the prefetches in flight (tests, shutdown)."""
        for fut in list(self.jobs.values()):
            fut.result(timeout)

    def _forget_oldest(self) -> None:
        done = [t for t, f in self.jobs.items() if f.done()]
        for task_id in done[:max(0, len(self.jobs) - MAX_REMEMBERED + 1)]:
            del self.jobs[task_id]

    def _fetch(self, job: Job) -> dict[str, str]:
        """What was fetched: {"dataset": ..., "model": ...}, each "ok", "skipped" or the error."""
        return {"dataset": self._try(job, "dataset", self._dataset), "model": self._try(job, "model", self._model)}

    def _try(self, job: Job, what: str, fn) -> str:
        try:
            return fn(job)
        except Exception as exc:  # the job's own start retries and reports the cause
            log.warning("prefetch of %s's %s failed (its own start will retry): %s", job.task_id, what, exc)
            return f"{type(exc).__name__}: {exc}"

    def _dataset(self, job: Job) -> str:
        dest = self.settings.job_dir(job.task_id) / DATASET_FILE
        ready = prefetched_path(dest)
        if dest.exists() or ready.exists():
            return "skipped"   # the job has started, or an earlier pass (before a restart) got it
        cap = self.settings.max_dataset_bytes
        fetch_file(job.dataset_url, ready, FetchLimits(cap, retries=0, total_timeout_s=PREFETCH_TIMEOUT_S))
        log.info("prefetched %s's dataset (%d bytes)", job.task_id, ready.stat().st_size)
        return "ok"

    def _model(self, job: Job) -> str:
        if Path(job.model).expanduser().is_dir() or not self.settings.prefetch_models:
            return "skipped"   # a local model needs no download; HF downloads only when configured
        resolve_model(job.model, self.settings.model_cache_dir, self.settings.hf_token)
        return "ok"
