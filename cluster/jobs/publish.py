"""Publishing a trained model: fix the adapter's base reference, upload the whole folder to
`<owner>/<expected_repo_name>` (retried with backoff within the job's deadline), then hash the
*uploaded* snapshot once (G.O.D's algorithm) so that the submission GET answers from the store
in milliseconds. A repo whose snapshot does not hash like the local folder is a partial upload:
it is uploaded again, never reported."""
from __future__ import annotations

import json
from pathlib import Path

from cluster.jobs.hub import (
    Hub,
    PartialUpload,
    RetryPolicy,
    call_with_retries,
    hub_from_settings,
    point_adapter_at_base,
    repo_owner,
)
from cluster.jobs.model_hash import calculate_model_hash
from cluster.settings import Settings
from cluster.state.store import PUBLISHED, PUBLISHING, Job, JobStore
from trainers.paths import CHECKPOINT_GLOB, CHECKPOINT_METRICS, best_by_dev


def publish(model_dir: Path, job: Job, settings: Settings, hub: Hub | None = None,
            policy: RetryPolicy = RetryPolicy()) -> tuple[str, str]:
    point_adapter_at_base(model_dir, job.model)
    expected = calculate_model_hash(model_dir)
    if expected is None:
        raise RuntimeError(f"{model_dir} holds no weight or config files to publish")
    repo = f"{repo_owner(settings)}/{job.expected_repo_name}"
    hub = hub or hub_from_settings(settings)

    def upload_and_verify() -> None:
        hub.upload_folder(model_dir, repo)
        got = calculate_model_hash(hub.snapshot(repo))
        if got != expected:
            raise PartialUpload(f"repo {repo} hashes {got}, the upload {expected}")

    # Leave a little of the deadline for the answer itself; retries never end past it.
    call_with_retries(upload_and_verify, deadline=job.deadline - 5, policy=policy, what=f"upload of {repo}")
    return repo, expected


def mark_published(store: JobStore, task_id: str, repo: str, model_hash: str) -> bool:
    """The one place a job becomes PUBLISHED (its driver, or the deadline watchdog): only from
    PUBLISHING, the state whoever publishes claimed first, so the two never both report."""
    return store.update_job(task_id, only_if_status=(PUBLISHING,), status=PUBLISHED, repo=repo,
                            model_hash=model_hash, reason=None)


def checkpoint_is_complete(path: Path) -> bool:
    """Weights whose safetensors header matches the file length, and configs that parse: a
    checkpoint cut short by a crash or a full disk fails this and is never published."""
    weights = sorted(Path(path).glob("*.safetensors"))
    configs = [p for p in (Path(path) / "adapter_config.json", Path(path) / "config.json") if p.exists()]
    if not weights or not configs:
        return False
    try:
        for cfg in configs:
            json.loads(cfg.read_text())
        for w in weights:
            _check_safetensors(w)
    except (OSError, ValueError):
        return False
    return True


def _check_safetensors(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("no header")
        n = int.from_bytes(head, "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != 8 + n + end:
        raise ValueError(f"{path.name} is {path.stat().st_size} bytes, its header says {8 + n + end}")


def best_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the lowest dev loss (the newest when none has one) among a
    job's Ray Train runs: what the fallback and the deadline watchdog publish."""
    found = [p for p in Path(run_dir).glob(f"*/{CHECKPOINT_GLOB}") if p.is_dir() and checkpoint_is_complete(p)]

    def dev_loss(p: Path):
        try:
            return json.loads((p / CHECKPOINT_METRICS).read_text()).get("dev_loss")
        except (OSError, ValueError):
            return None
    return best_by_dev(found, dev_loss, lambda p: p.stat().st_mtime)


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def upload_estimate_s(nbytes: int, bandwidth_bytes_s: float, fixed_s: float = 3.0) -> float:
    """How long an upload of `nbytes` should take, hashing included, for the watchdog's timing."""
    return fixed_s + 2 * nbytes / max(1.0, bandwidth_bytes_s)
