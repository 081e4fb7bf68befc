"""Where models are published: the real Hugging Face Hub, or a local hub directory.

Both implement the same small interface (`upload_folder`, `snapshot`), which is all the
publisher and the validator simulator use; the local hub is the embedded default and the
stand-in for the Hub in tests (no network here).
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from cluster.settings import Settings


class Hub(Protocol):
    def upload_folder(self, folder: Path, repo_id: str) -> None: ...
    def snapshot(self, repo_id: str) -> Path: ...


class LocalHub:
    """Repos are folders `<root>/<user>/<name>`; an upload replaces the whole repo atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _repo_dir(self, repo_id: str) -> Path:
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
            raise ValueError(f"invalid repo id {repo_id!r}: expected 'user/name'")
        return self.root / parts[0] / parts[1]

    def upload_folder(self, folder: Path, repo_id: str) -> None:
        dest = self._repo_dir(repo_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.with_name(dest.name + ".uploading")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging)
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)

    def snapshot(self, repo_id: str) -> Path:
        path = self._repo_dir(repo_id)
        if not path.is_dir():
            raise FileNotFoundError(f"repo {repo_id} not found in local hub {self.root}")
        return path


class HuggingFaceHub:
    """The real Hub: public repos, as the validator downloads them without a token."""

    def __init__(self, token: str, cache_dir: Path):
        from huggingface_hub import HfApi

        self.token = token
        self.cache_dir = cache_dir
        self.api = HfApi(token=token)

    def upload_folder(self, folder: Path, repo_id: str) -> None:
        self.api.create_repo(repo_id, private=False, exist_ok=True)
        self.api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="miner submission")
        self.api.update_repo_visibility(repo_id, private=False)

    def snapshot(self, repo_id: str) -> Path:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, token=self.token, cache_dir=str(self.cache_dir)))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for uploads; never sleeps past the deadline given."""
    attempts: int = 8
    base_s: float = 2.0
    max_s: float = 60.0


class PartialUpload(RuntimeError):
    """The uploaded repo does not hold exactly what we uploaded (an interrupted upload)."""


def is_retryable(exc: BaseException) -> bool:
    """HTTP 408/429/5xx, timeouts, dropped connections and partial uploads are worth another
    try; 4xx answers (bad token, bad repo name) and local errors are not."""
    if isinstance(exc, PartialUpload):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status in (408, 429) or status >= 500
    # Transport errors of httpx, of the Hub client's httpx2, and of requests, by class name.
    transport = {"TransportError", "TimeoutException", "ConnectionError", "Timeout"}
    return isinstance(exc, (TimeoutError, ConnectionError)) or any(c.__name__ in transport for c in type(exc).__mro__)


def call_with_retries(fn: Callable[[], object], deadline: float, policy: RetryPolicy = RetryPolicy(),
                      what: str = "upload", sleep: Callable[[float], None] = time.sleep) -> int:
    """Runs `fn` until it succeeds; returns the number of tries. Gives up (re-raising the last
    error) on a non-retryable error, after `policy.attempts`, or when the next pause would end
    past `deadline` (unix time)."""
    for attempt in range(1, policy.attempts + 1):
        try:
            fn()
            return attempt
        except Exception as exc:
            pause = min(policy.max_s, policy.base_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            if not is_retryable(exc) or attempt == policy.attempts or time.time() + pause >= deadline:
                raise
            print(f"[hub] {what} try {attempt} failed ({type(exc).__name__}: {exc}); retrying in {pause:.1f} s",
                  flush=True)
            sleep(pause)
    raise AssertionError("unreachable")


def hub_from_settings(settings: Settings) -> Hub:
    if settings.publishes_to_hf:
        return HuggingFaceHub(settings.hf_token, settings.state_dir / "hf_cache")
    return LocalHub(settings.hub_dir)


def repo_owner(settings: Settings) -> str:
    return settings.hf_username if settings.publishes_to_hf else "local"


def point_adapter_at_base(folder: Path, base_model_id: str) -> None:
    """The validator resolves the base from `adapter_config.base_model_name_or_path`, which must
    be the HF id (or, for local demo models, the path it was given) - never our cache path."""
    cfg_path = folder / "adapter_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_model_id
        cfg_path.write_text(json.dumps(cfg, indent=2))
