"""The control plane: offers, training requests, submissions, and reconciliation with Ray.

State lives in the SQLite store, work in Ray Jobs; this object holds neither, so the Serve
replica that owns it can die and come back without losing anything.

Crash rules (issue #8, proven in tests/faults/):
- A job is promised once its row is committed, which happens before start_training answers.
  From then on reconcile owns it: it submits queued jobs, resubmits jobs whose Ray Job the
  cluster no longer knows (head restart: Ray Train resumes from the run's checkpoints), retries
  a driver that died without an outcome while time is left, and hands the job to the deadline
  watchdog (watchdog.py) when it is late or out of retries.
- An accepted offer reserves its planned GPUs for MINER_RESERVATION_TTL_S (restored from the
  store after a restart); start_training for it takes over that reservation, or re-runs
  admission if the reservation has expired. An offer never followed by start_training
  simply expires and frees what it held.
- A job's driver holds an exclusive lock on its folder, and each state change is a
  conditional update, so no job trains or publishes twice.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from cluster.jobs.watchdog import Watchdog
from cluster.plan import Plan
from cluster.planning.admission import Admission, Decision, Limits, Request
from cluster.planning.dataset_checks import check_request
from cluster.planning.knowledge import Knowledge, Run, family_of, local_config
from cluster.planning.ledger import ClusterView, initial_view, view_from_ray
from cluster.planning.model_check import HubConfigSource, ModelChecker
from cluster.planning.scheduling import JOB, OFFER, Item, Scheduler, restore
from cluster.protocol.wire import (
    MinerSubmission,
    MinerTaskOffer,
    MinerTaskResponse,
    TaskType,
    TrainRequestText,
    TrainResponse,
    task_type_of,
)
from cluster.settings import Settings
from cluster.state import metrics
from cluster.state.offer_log import OfferLog
from cluster.state.store import ACTIVE, FAILED, PUBLISHED, PUBLISHING, QUEUED, SUBMITTED, TERMINAL, Job, JobStore, Offer

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
    """`view`: a fixed cluster shape (tests, simulations); otherwise MINER_CLUSTER or this
    machine until the reconcile loop reads Ray's nodes."""

    def __init__(self, settings: Settings, store: JobStore | None = None, runner=None,
                 view: ClusterView | None = None, prefetch=None, models: ModelChecker | None = None, hub=None):
        self.settings = settings
        # prefetch(job) downloads the data/model of a job queued next while others train
        if prefetch is None and settings.prefetch_jobs > 0:
            from cluster.jobs.prefetch import Prefetcher

            prefetch = Prefetcher(settings)
        self.prefetch = prefetch
        self.store = store or JobStore(settings.db_path)
        self.offers = OfferLog(self.store)  # offer decisions: answered from memory, written in batches
        self._runner = runner
        self._fixed_view = view is not None or bool(settings.cluster_shape)
        self.scheduler = Scheduler(view or initial_view(settings.use_gpu, settings.num_workers, settings.cluster_shape),
                                   reservation_ttl_s=settings.reservation_ttl_s)
        self.knowledge = Knowledge(self.store)
        self.admission = Admission(self.scheduler, self.knowledge,
                                   Limits(settings.min_hours, settings.max_hours, settings.num_workers))
        restore(self.scheduler, self.store, time.time(), self._plan_legacy)
        self.models = models or ModelChecker(
            HubConfigSource(settings.hf_token, settings.model_cache_dir) if settings.model_lookup == "hub" else None)
        self.watchdog = Watchdog(settings, self.store, lambda: self.runner, hub=hub)
        self._cache_cleaned_at = 0.0

    @property
    def runner(self):
        if self._runner is None:  # created lazily: it needs a running Ray cluster
            from cluster.jobs.runner import RayJobRunner

            self._runner = RayJobRunner()
        return self._runner

    # offers -----------------------------------------------------------------
    def offer(self, offer: MinerTaskOffer) -> MinerTaskResponse:
        """Answered from memory (ledger, queue, knowledge); the record is written behind."""
        started, now = time.perf_counter(), time.time()
        problem = self.models.problem(offer.model)  # cached; a first lookup waits <= 1 s
        if problem:
            d = Decision(False, f"declined: {problem}")
        else:
            d = self.admission.decide(self._request(offer.task_id, offer.task_type, offer.model,
                                                    offer.hours_to_complete, offer.model_params_count), now)
        expires = now + self.scheduler.reservation_ttl_s if d.accepted else None
        if d.accepted:
            self.scheduler.add(Item(offer.task_id, d.plan, now + offer.hours_to_complete * 3600, OFFER, expires,
                                    d.placement.node_id))
        self.offers.record(Offer(offer.task_id, offer.task_type.value, offer.model,
                                 offer.hours_to_complete, d.accepted, d.message, now,
                                 d.plan, expires))
        metrics.record_offer(d.accepted, d.message, time.perf_counter() - started)
        return MinerTaskResponse(message=d.message, accepted=d.accepted)

    def _request(self, task_id: str, task_type: TaskType, model: str, hours: float, params: int | None) -> Request:
        config = local_config(model, self.settings.model_cache_dir) or self.models.config(model)
        return Request(task_id, task_type, model, hours, params, config)

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
        if task_type is TaskType.GRPOTASK:
            from trainers.reward_sandbox import reward_functions_problem

            problem = reward_functions_problem(dataset_type.model_dump())
            if problem:
                raise Refused(422, problem)
        existing = self.store.get_job(req.task_id)
        if existing is not None:  # a retried request: same answer, nothing queued twice
            return TrainResponse(message=f"Training job already known ({existing.status}).", task_id=req.task_id)
        offer = self.offers.get(req.task_id)
        if offer is not None and not offer.accepted:
            raise Refused(409, f"this task's offer was declined: {offer.message}")
        now = time.time()
        reserved = self.scheduler.queue.get(req.task_id)
        hint = None
        if reserved is not None and reserved.kind == OFFER:
            plan, hint = reserved.plan, reserved.node_hint   # the offer's reservation becomes the job
        else:
            d = self.admission.decide(self._request(req.task_id, task_type, req.model, req.hours_to_complete,
                                                    None), now, kind=JOB)
            if not d.accepted:
                raise Refused(422, d.message)
            plan, hint = d.plan, d.placement.node_id
        job = Job(task_id=req.task_id, task_type=task_type.value, model=req.model, dataset_url=req.dataset,
                  dataset_type=dataset_type.model_dump(), file_format=req.file_format.value,
                  expected_repo_name=req.expected_repo_name or str(uuid.uuid4()),
                  hours_to_complete=req.hours_to_complete, created_at=now,
                  deadline=now + req.hours_to_complete * 3600, plan=plan)
        self.store.add_job(job)
        self.scheduler.add(Item(job.task_id, plan, job.deadline, JOB, node_hint=hint))
        self.dispatch()
        return TrainResponse(message="Training job enqueued.", task_id=req.task_id)

    # queue ------------------------------------------------------------------
    def dispatch(self) -> list[str]:
        """Starts the queued jobs whose turn it is (deadline first) on the node planned for them."""
        now, started = time.time(), []
        for item, where in self.scheduler.due(now):
            job = self.store.get_job(item.task_id)
            if job is None or job.status != QUEUED:
                self.scheduler.finish(item.task_id)
                continue
            placed = item.plan.placed(where.node_id, where.start, where.end, self.scheduler.view.source == "ray")
            self.store.update_job(job.task_id, only_if_status=(QUEUED,), plan=placed, started_at=now)
            self.scheduler.start(job.task_id, where.node_id, now, where.end, item.units)
            job.plan, job.started_at = placed, now
            self._submit(job)
            started.append(job.task_id)
        self.scheduler.late(now)  # warm the schedule here, so the next offer only checks itself
        return started

    def _plan_legacy(self, job: Job) -> Plan | None:
        """A plan for a job stored before plans were (older databases)."""
        options, _ = self.admission.options(job.task_type, self.admission.params_of(
            self._request(job.task_id, TaskType(job.task_type), job.model, job.hours_to_complete, None)))
        return options[0] if options else None

    def refresh_view(self) -> None:
        """The reconcile loop's Ray call; offers only ever read the result."""
        import ray

        if not self._fixed_view and ray.is_initialized():
            self.scheduler.set_view(view_from_ray(self.settings.num_workers))

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
        """Brings the store in line with Ray (see the crash rules at the top of this module), then
        refreshes the GPU view, frees what finished jobs held and starts the next jobs."""
        try:
            self.refresh_view()
        except Exception as exc:  # keep planning with the last view
            log.warning("could not refresh the cluster view: %s", exc)
        self.scheduler.expire(time.time())
        for task_id in list(self.scheduler.ledger.holds):
            job = self.store.get_job(task_id)
            if job is None or job.status in TERMINAL:
                self.scheduler.finish(task_id)
        for job in self.store.list_jobs(ACTIVE):
            if job.task_id not in self.watchdog.busy:
                self._reconcile_job(job)
        if time.time() - self._cache_cleaned_at > CACHE_CLEAN_EVERY_S:
            self._cache_cleaned_at = time.time()
            from cluster.state.cache import clean

            for path in clean(self.settings, self.store):
                log.info("cache: evicted %s", path)
        self.knowledge.reload()  # jobs record their own outcomes from their Ray Job
        self.dispatch()
        if self.prefetch is not None:   # in the background: it never holds up this loop
            for item in self.scheduler.next_jobs(time.time(), max(1, self.settings.prefetch_jobs)):
                job = self.store.get_job(item.task_id)
                if job is not None and job.status == QUEUED and not job.started_at:
                    self.prefetch(job)

    def _reconcile_job(self, job: Job) -> None:
        if time.time() > job.deadline:
            self.store.update_job(job.task_id, only_if_status=ACTIVE, status=FAILED,
                                  reason="deadline passed before a model was published")
            self.scheduler.finish(job.task_id)
            return
        if job.status == QUEUED and not job.started_at:
            return  # waiting for its turn in the queue
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
            self.scheduler.finish(job.task_id)
            self._learn_failure(job, why)

    def _learn_failure(self, job: Job, reason: str) -> None:
        family = family_of(local_config(job.model, self.settings.model_cache_dir))
        if family:
            self.knowledge.record(Run.of(family, FAILED, job, reason=reason))
