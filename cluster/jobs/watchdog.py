"""The deadline guard: publishes a job's best checkpoint so far when its own driver has not
published by (deadline - upload estimate - margin), whatever the trainer is doing (stuck in a
collective, sleeping, swapping). It lives in the control plane's reconcile loop, not in the
trainer, so a wedged trainer cannot wedge it.

It also rescues jobs whose driver is gone without an outcome when no retry is left.

Taking a job over is a claim in the store (the job moves to `publishing` only from a
not-yet-publishing state), so the driver and the guard never both publish: the driver's own
move to `publishing` fails once the guard holds the job, and the guard stops the Ray Job.
Uploads run on a small thread pool: one slow upload does not hold up the loop or other jobs.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from cluster.jobs.publish import best_checkpoint, checkpoint_bytes, mark_published, publish, upload_estimate_s
from cluster.settings import Settings
from cluster.state.store import ACTIVE, FAILED, PUBLISHING, QUEUED, RUNNING, SUBMITTED, Job, JobStore
from trainers.paths import JobPaths

log = logging.getLogger("miner.watchdog")
MIN_MARGIN_S = 3.0
MARGIN_FRACTION = 0.03  # of the job's whole budget, so that short jobs are not guarded too early


class Watchdog:
    def __init__(self, settings: Settings, store: JobStore, runner_fn, hub=None, threads: int = 2):
        self.settings, self.store, self._runner_fn, self.hub = settings, store, runner_fn, hub
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="watchdog")
        self.busy: dict[str, Future] = {}

    def guard_time(self, job: Job, checkpoint: Path | None) -> float:
        """When the guard takes over: the upload of this checkpoint must still fit."""
        budget = job.deadline - job.created_at
        margin = min(self.settings.watchdog_margin_s, max(MIN_MARGIN_S, MARGIN_FRACTION * budget))
        size = checkpoint_bytes(checkpoint) if checkpoint else 0
        return job.deadline - upload_estimate_s(size, self.settings.upload_bandwidth_bytes_s) - margin

    def is_due(self, job: Job) -> bool:
        return time.time() >= self.guard_time(job, best_checkpoint(self._runs(job)))

    def take_over(self, job: Job, why: str, stop_driver: bool) -> bool:
        """Claims the job and publishes its best checkpoint in the background; False (nothing
        changed) when there is no complete checkpoint or someone else holds the job."""
        if job.task_id in self.busy:
            return True
        checkpoint = best_checkpoint(self._runs(job))
        if checkpoint is None:
            return False
        claim_from = (QUEUED, SUBMITTED, RUNNING) if stop_driver else ACTIVE
        if not self.store.update_job(job.task_id, only_if_status=claim_from, status=PUBLISHING,
                                     reason=f"watchdog: {why}"):
            return False
        log.warning("watchdog takes over %s (%s): publishing %s", job.task_id, why, checkpoint)
        if stop_driver:
            try:
                self._runner_fn().stop(job.submission_id)
            except Exception as exc:  # already gone: nothing to stop
                log.info("stopping %s: %s", job.submission_id, exc)
        self.busy[job.task_id] = self._pool.submit(self._publish, job, checkpoint, why)
        self.busy[job.task_id].add_done_callback(lambda _f, tid=job.task_id: self.busy.pop(tid, None))
        return True

    def _publish(self, job: Job, checkpoint: Path, why: str) -> None:
        from trainers.launch import export_checkpoint

        started = time.time()
        try:
            out = export_checkpoint(checkpoint, self.settings.job_dir(job.task_id) / "model")
            repo, model_hash = publish(out, job, self.settings, hub=self.hub)
        except Exception as exc:
            log.exception("watchdog publish of %s failed", job.task_id)
            self.store.update_job(job.task_id, only_if_status=(PUBLISHING,), status=FAILED,
                                  reason=f"watchdog publish failed: {type(exc).__name__}: {exc}"[:1000])
            return
        self.store.add_fault(job.task_id, {"kind": "watchdog_publish", "why": why, "checkpoint": checkpoint.name,
                                           "upload_s": round(time.time() - started, 2),
                                           "slack_s": round(job.deadline - time.time(), 2)})
        mark_published(self.store, job.task_id, repo, model_hash)

    def wait(self, timeout: float | None = None) -> None:
        """Waits for the uploads in flight (tests, shutdown)."""
        for fut in list(self.busy.values()):
            fut.result(timeout)

    def _runs(self, job: Job) -> Path:
        return JobPaths(self.settings.job_dir(job.task_id)).runs
