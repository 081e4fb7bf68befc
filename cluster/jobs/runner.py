"""One Ray Job per training job: submission id `miner-<task_id>`, metadata for the dashboard.

Jobs run in the job supervisor's process tree, not in a Serve replica, so they survive
Serve redeploys and show in the dashboard's Jobs tab.
"""
from __future__ import annotations

import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.planning.capacity import placement
from cluster.settings import RAY_TRAIN_ENV, Settings
from cluster.state.store import Job


class RayJobRunner:
    def __init__(self, address: str | None = None):
        self.client = JobSubmissionClient(address)

    def submit(self, job: Job, settings: Settings, entrypoint: str | None = None) -> str:
        # Use this interpreter: the cluster PATH's `python` may not have the miner installed.
        entrypoint = entrypoint or f"{sys.executable} -m cluster.jobs.job_main --task-id {job.task_id}"
        shape = placement(job.plan)
        metadata = {
            "kind": "miner-finetune", "task_id": job.task_id, "task_type": job.task_type,
            "model": job.model[:200], "expected_repo_name": job.expected_repo_name,
            "deadline": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.deadline)),
            **{k: str(v) for k, v in (job.plan.to_dict() if job.plan else {}).items()
               if k in ("method", "gpus", "gpu_type", "workers", "node_id") and v is not None},
        }
        return self.client.submit_job(
            entrypoint=entrypoint, submission_id=job.submission_id, metadata=metadata,
            runtime_env={"env_vars": {**settings.as_env(), **RAY_TRAIN_ENV}}, entrypoint_num_cpus=0, entrypoint_num_gpus=0,
            entrypoint_resources=shape["driver_resources"] or None,
            entrypoint_label_selector=shape["label_selector"] or None)

    def status(self, submission_id: str) -> tuple[str | None, str]:
        """(status, message) of a Ray Job, (None, "") when the cluster does not know it."""
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError:
            return None, ""
        return str(info.status.value if isinstance(info.status, JobStatus) else info.status), info.message or ""

    def stop(self, submission_id: str) -> None:
        """Stops the job's driver (and with it its Train workers)."""
        self.client.stop_job(submission_id)

    def forget(self, submission_id: str) -> None:
        """Deletes a finished job's record so that its submission id can be used again."""
        try:
            self.client.delete_job(submission_id)
        except RuntimeError:
            pass  # not known to this cluster
