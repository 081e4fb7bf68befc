"""The control plane: offers, training requests, submissions, and reconciliation with Ray.

State lives in the SQLite store, work in Ray Jobs; this object holds neither, so the Serve
replica that owns it can die and come back without losing anything.

Crash rules (issue #8, proven in tests/faults/):
- A job is promised once its row is committed, which happens before start_training answers.
  From then on reconcile owns it: it submits queued jobs, resubmits jobs whose Ray Job the
  cluster no longer knows (head restart: Ray Train resumes from the run's checkpoints), retries
  a driver that died without an outcome while time is left, and hands the job to the deadline
  watchdog (watchdog.py) when it is late or out of retries.
- An accepted offer is not a reservation: start_training for it re-runs admission and is
  honoured if the miner can still take it, whether or not the miner restarted in between;
  an offer never followed by start_training holds nothing and simply expires.
- A job's driver holds an exclusive lock on its folder, and each state change is a
  conditional update, so no job trains or publishes twice.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from . import admission
from .dataset_checks import check_request
from .model_check import HubConfigSource, ModelChecker
from .offer_log import OfferLog
from .protocol import (MinerSubmission, MinerTaskOffer, MinerTaskResponse, TaskType, TrainRequestText,
                       TrainResponse, parse_dataset_type, task_type_of)
from .settings import Settings
from .store import ACTIVE, FAILED, PUBLISHED, PUBLISHING, QUEUED, SUBMITTED, Job, JobStore, Offer
from .watchdog import Watchdog

log = logging.getLogger("miner.control")
RESUBMIT_GRACE_S = 15.0
MAX_DRIVER_ATTEMPTS = 3      # driver starts per job before the watchdog publishes what there is
CACHE_CLEAN_EVERY_S = 600.0


@dataclass
class Refused(Exception):
    """A request we will not take: `status` is the HTTP status, `reason` the answer's detail."""
    status: int
    reason: str


class ControlPlane:
    def __init__(self, settings: Settings, store: JobStore | None = None, runner=None,
                 models: ModelChecker | None = None, hub=None):
        self.settings = settings
        self.store = store or JobStore(settings.db_path)
        self.offers = OfferLog(self.store)  # offer decisions: answered from memory, written in batches
        self._runner = runner
        self.models = models or ModelChecker(
            HubConfigSource(settings.hf_token, settings.model_cache_dir) if settings.model_lookup == "hub" else None)
        self.watchdog = Watchdog(settings, self.store, lambda: self.runner, hub=hub)
        self._cache_cleaned_at = 0.0

    @property
    def runner(self):
        if self._runner is None:  # created lazily: it needs a running Ray cluster
            from .runner import RayJobRunner

            self._runner = RayJobRunner()
        return self._runner

    # offers -----------------------------------------------------------------
    def offer(self, offer: MinerTaskOffer) -> MinerTaskResponse:
        d = admission.decide(offer.task_type, offer.model, offer.hours_to_complete,
                             offer.model_params_count, self.settings)
        problem = self.models.problem(offer.model) if d.accepted else None
        if problem:
            d = admission.Decision(False, f"declined: {problem}")
        self.offers.record(Offer(offer.task_id, offer.task_type.value, offer.model,
                                      offer.hours_to_complete, d.accepted, d.message, time.time()))
        return MinerTaskResponse(message=d.message, accepted=d.accepted)

    # training ---------------------------------------------------------------
    def start_training(self, req: TrainRequestText, endpoint_types: set[TaskType]) -> TrainResponse:
        try:
            uuid.UUID(req.task_id)
        except ValueError:
            raise Refused(422, f"task_id {req.task_id!r} is not a UUID")
        try:
            dataset_type = req.parsed_dataset_type()
        except ValueError as exc:
            raise Refused(422, f"invalid dataset_type: {exc}")
        task_type = task_type_of(dataset_type)
        if task_type not in endpoint_types:
            raise Refused(422, f"a {task_type.value} dataset_type does not belong on this endpoint")
        problem = check_request(req.dataset, req.dataset_type) or self.models.problem(req.model)
        if problem:
            raise Refused(422, problem)
        existing = self.store.get_job(req.task_id)
        if existing is not None:  # a retried request: same answer, nothing queued twice
            return TrainResponse(message=f"Training job already known ({existing.status}).", task_id=req.task_id)
        offer = self.offers.get(req.task_id)
        if offer is not None and not offer.accepted:
            raise Refused(409, f"this task's offer was declined: {offer.message}")
        d = admission.decide(task_type, req.model, req.hours_to_complete, None, self.settings)
        if not d.accepted:
            raise Refused(422, d.message)
        now = time.time()
        job = Job(task_id=req.task_id, task_type=task_type.value, model=req.model, dataset_url=req.dataset,
                  dataset_type=dataset_type.model_dump(), file_format=req.file_format.value,
                  expected_repo_name=req.expected_repo_name or str(uuid.uuid4()),
                  hours_to_complete=req.hours_to_complete, created_at=now,
                  deadline=now + req.hours_to_complete * 3600)
        self.store.add_job(job)
        self._submit(job)
        return TrainResponse(message="Training job enqueued.", task_id=req.task_id)

    def _submit(self, job: Job) -> None:
        try:
            sid = self.runner.submit(job, self.settings)
        except Exception as exc:  # the job stays queued; reconcile() retries it
            log.warning("could not submit Ray Job for %s yet: %s", job.task_id, exc)
            return
        self.store.update_job(job.task_id, only_if_status=(QUEUED,), status=SUBMITTED, ray_submission_id=sid)

    # submissions ------------------------------------------------------------
    def submission(self, task_id: str) -> MinerSubmission | None:
        job = self.store.get_job(task_id)
        if job is None or job.status != PUBLISHED or not job.repo:
            return None
        return MinerSubmission(repo=job.repo, model_hash=job.model_hash)

    # reconciliation ---------------------------------------------------------
    def reconcile(self) -> None:
        """Brings the store in line with Ray (see the crash rules at the top of this module)."""
        for job in self.store.list_jobs(ACTIVE):
            if job.task_id not in self.watchdog.busy:
                self._reconcile_job(job)
        if time.time() - self._cache_cleaned_at > CACHE_CLEAN_EVERY_S:
            self._cache_cleaned_at = time.time()
            from .cache import clean

            for path in clean(self.settings, self.store):
                log.info("cache: evicted %s", path)

    def _reconcile_job(self, job: Job) -> None:
        if time.time() > job.deadline:
            self.store.update_job(job.task_id, only_if_status=ACTIVE, status=FAILED,
                                  reason="deadline passed before a model was published")
            return
        status, message = self.runner.status(job.submission_id)
        if status is None and time.time() - job.updated_at < RESUBMIT_GRACE_S:
            return  # start_training may be submitting it right now
        if status is None:  # the cluster lost it (head restart): run it again, it resumes
            if job.status == SUBMITTED or job.attempts:
                self.store.add_fault(job.task_id, {"kind": "ray_job_lost", "was": job.status})
            self.store.update_job(job.task_id, only_if_status=ACTIVE, status=QUEUED)
            self._submit(job)
        elif status in ("PENDING", "RUNNING"):
            if job.status != PUBLISHING and self.watchdog.is_due(job):
                self.watchdog.take_over(job, "not published by the guard time", stop_driver=True)
        else:  # the driver ended without recording an outcome (killed, OOM, crashed)
            self._driver_gone(job, status, message)

    def _driver_gone(self, job: Job, status: str, message: str) -> None:
        latest = self.store.get_job(job.task_id)
        if latest is None or latest.status not in ACTIVE:
            return
        why = f"Ray Job {status.lower()} without an outcome: {message[-300:]}"
        if status == "FAILED" and latest.attempts < MAX_DRIVER_ATTEMPTS and not self.watchdog.is_due(latest):
            self.store.add_fault(job.task_id, {"kind": "driver_died", "detail": why})
            self.runner.forget(job.submission_id)
            self.store.update_job(job.task_id, only_if_status=ACTIVE, status=QUEUED)
            self._submit(latest)
        elif not self.watchdog.take_over(latest, why, stop_driver=False):
            self.store.update_job(job.task_id, only_if_status=ACTIVE, status=FAILED, reason=why)
