"""Publishing a trained model: fix the adapter's base reference, upload the whole folder to
`<owner>/<expected_repo_name>`, then hash the *uploaded* snapshot once (G.O.D's algorithm) so
that the submission GET answers from the store in milliseconds."""
from __future__ import annotations

from pathlib import Path

from .hub import hub_from_settings, point_adapter_at_base, repo_owner
from .model_hash import calculate_model_hash
from .settings import Settings
from .store import Job


def publish(model_dir: Path, job: Job, settings: Settings) -> tuple[str, str]:
    point_adapter_at_base(model_dir, job.model)
    repo = f"{repo_owner(settings)}/{job.expected_repo_name}"
    hub = hub_from_settings(settings)
    hub.upload_folder(model_dir, repo)
    model_hash = calculate_model_hash(hub.snapshot(repo))
    if model_hash is None:
        raise RuntimeError(f"published repo {repo} holds no weight or config files")
    return repo, model_hash


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest Ray Train checkpoint of a run that holds publishable weights: the fallback
    when training dies after it has saved something."""
    found = [p for p in Path(run_dir).glob("*/checkpoint_*")
             if (p / "adapter_model.safetensors").exists() or (p / "config.json").exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
