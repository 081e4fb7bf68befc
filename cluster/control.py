"""The control plane: offers, training requests, submissions, and reconciliation with Ray.

State lives in the SQLite store, work in Ray Jobs; this object holds neither, so the Serve
replica that owns it can die and come back without losing anything.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from . import admission, metrics
from .offer_log import OfferLog
from .protocol import (MinerSubmission, MinerTaskOffer, MinerTaskResponse, TaskType, TrainRequestText,
                       TrainResponse, parse_dataset_type, task_type_of)
from .settings import Settings
from .store import ACTIVE, FAILED, PUBLISHED, QUEUED, SUBMITTED, Job, JobStore, Offer

log = logging.getLogger("miner.control")
RESUBMIT_GRACE_S = 15.0


@dataclass
class Refused(Exception):
    """A request we will not take: `status` is the HTTP status, `reason` the answer's detail."""
    status: int
    reason: str


class ControlPlane:
    def __init__(self, settings: Settings, store: JobStore | None = None, runner=None):
        self.settings = settings
        self.store = store or JobStore(settings.db_path)
        self.offers = OfferLog(self.store)  # offer decisions: answered from memory, written in batches
        self._runner = runner

    @property
    def runner(self):
        if self._runner is None:  # created lazily: it needs a running Ray cluster
            from .runner import RayJobRunner

            self._runner = RayJobRunner()
        return self._runner

    # offers -----------------------------------------------------------------
    def offer(self, offer: MinerTaskOffer) -> MinerTaskResponse:
        started = time.perf_counter()
        d = admission.decide(offer.task_type, offer.model, offer.hours_to_complete,
                             offer.model_params_count, self.settings)
        self.offers.record(Offer(offer.task_id, offer.task_type.value, offer.model,
                                      offer.hours_to_complete, d.accepted, d.message, time.time()))
        metrics.record_offer(d.accepted, d.message, time.perf_counter() - started)
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
        """Brings the store in line with Ray: submits queued jobs, resubmits jobs whose Ray Job
        vanished (cluster restart; Ray Train resumes from the run's checkpoints), and fails jobs
        whose Ray Job ended without the job itself recording an outcome."""
        for job in self.store.list_jobs(ACTIVE):
            if time.time() > job.deadline:
                self.store.update_job(job.task_id, only_if_status=ACTIVE, status=FAILED,
                                      reason="deadline passed before a model was published")
                continue
            status, message = self.runner.status(job.submission_id)
            if status is None and time.time() - job.updated_at < RESUBMIT_GRACE_S:
                continue  # start_training may be submitting it right now
            if status is None:
                self.store.update_job(job.task_id, only_if_status=ACTIVE, status=QUEUED)
                self._submit(job)
            elif status in ("FAILED", "STOPPED"):
                latest = self.store.get_job(job.task_id)
                if latest and latest.status in ACTIVE:
                    self.store.update_job(job.task_id, only_if_status=ACTIVE, status=FAILED,
                                          reason=f"Ray Job {status.lower()}: {message[-500:]}")
