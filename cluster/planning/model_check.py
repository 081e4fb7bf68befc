"""Is a base model one we can train? Decided from its config.json: at offer time (declined when
knowable) and again on the downloaded files at job start (failed fast, with the tokenizer).

The config comes from a `ModelSource`: a local directory, or the Hugging Face Hub (one small
file, short timeout, cached). A lookup that cannot answer (offline, timeout) is not a reason to
decline: the job's own download will tell, and fail fast.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Protocol


class ModelMissing(LookupError):
    """The model does not exist, or is private to us."""


class ModelGated(LookupError):
    """The model exists but needs accepted terms / a token we lack."""


class LookupUnavailable(LookupError):
    """No answer now (offline, timeout, 5xx): not a reason to decline."""


class ModelSource(Protocol):
    def config(self, model: str) -> dict: ...


class HubConfigSource:
    """config.json from the Hub, as the validator would fetch the base model (no token unless set)."""

    def __init__(self, token: str | None = None, cache_dir: Path | None = None, timeout_s: float = 3.0):
        self.token, self.cache_dir, self.timeout_s = token, cache_dir, timeout_s

    def config(self, model: str) -> dict:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            path = hf_hub_download(model, "config.json", token=self.token, etag_timeout=self.timeout_s,
                                   cache_dir=str(self.cache_dir) if self.cache_dir else None)
        except GatedRepoError as exc:
            raise ModelGated(f"model {model!r} is gated: its terms must be accepted with a token") from exc
        except RepositoryNotFoundError as exc:
            raise ModelMissing(f"model {model!r} does not exist on the Hub or is private") from exc
        except LocalEntryNotFoundError as exc:  # offline / unreachable: before the remote case below
            raise LookupUnavailable(str(exc)) from exc
        except EntryNotFoundError as exc:
            raise ModelMissing(f"model {model!r} has no config.json (not a transformers model)") from exc
        except Exception as exc:
            raise LookupUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return json.loads(Path(path).read_text())


def config_problem(config: dict) -> str | None:
    """Why a model with this config cannot be trained here, else None."""
    if config.get("auto_map"):
        return "model requires trust_remote_code (custom modelling code), which this miner does not run"
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return f"unsupported architecture: model_type {model_type!r} is unknown to transformers"
    archs = config.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return f"unsupported architecture {archs[0]!r}: not a causal language model"
    return None


_UNKNOWN = "unknown"      # a lookup that got no answer (offline, timeout)
UNKNOWN_TTL_S = 120.0     # retried after this long


class ModelChecker:
    """Offer-time check with a TTL cache (validators offer the same models repeatedly). A lookup
    waits at most `wait_s` (the offer must be answered within 3 s); a slower one goes on in the
    background and its answer serves the next offer and the task's start_training."""

    def __init__(self, source: ModelSource | None, ttl_s: float = 3600.0, wait_s: float = 1.0):
        self.source, self.ttl_s, self.wait_s = source, ttl_s, wait_s
        self._cache: dict[str, tuple[float, str | None, dict | None]] = {}  # model -> (when, problem, config)
        self._inflight: dict[str, object] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-lookup")

    def problem(self, model: str) -> str | None:
        local = Path(model).expanduser()
        if local.is_dir():
            cfg = local / "config.json"
            return config_problem(json.loads(cfg.read_text())) if cfg.exists() else f"{model} has no config.json"
        if self.source is None:
            return None
        with self._lock:
            hit = self._fresh(model)
            if hit:
                return None if hit[1] is _UNKNOWN else hit[1]
            if model in self._inflight:
                return None  # someone is already waiting on this lookup: don't queue behind it
            future = self._inflight[model] = self._pool.submit(self._lookup, model)
        try:
            answer = future.result(timeout=self.wait_s)
        except FutureTimeout:
            return None  # not known yet: accept; the lookup finishes in the background
        return None if answer is _UNKNOWN else answer

    def answers_now(self, model: str) -> bool:
        """Whether problem() returns without waiting on a lookup: the API answers such offers on
        its event loop instead of hopping to a worker thread."""
        if self.source is None or Path(model).expanduser().is_dir():
            return True
        with self._lock:
            return bool(self._fresh(model)) or model in self._inflight

    def _fresh(self, model: str) -> tuple | None:
        hit = self._cache.get(model)
        if hit and time.monotonic() - hit[0] < (self.ttl_s if hit[1] is not _UNKNOWN else UNKNOWN_TTL_S):
            return hit
        return None

    def config(self, model: str) -> dict | None:
        """The config.json a lookup already brought back (never waits): sizes the capacity plan."""
        with self._lock:
            hit = self._cache.get(model)
        return hit[2] if hit else None

    def _lookup(self, model: str) -> str | None:
        config = None
        try:
            config = self.source.config(model)
            answer = config_problem(config)
        except (ModelMissing, ModelGated) as exc:
            answer = str(exc)
        except Exception as exc:  # no answer now (offline, timeout, odd reply): not a reason to decline
            answer = _UNKNOWN
            if not isinstance(exc, LookupUnavailable):
                print(f"[model-check] lookup of {model!r} failed: {type(exc).__name__}: {exc}", flush=True)
        with self._lock:
            # "unknown" is remembered briefly too: an unreachable Hub must not cost every offer a wait
            self._cache[model] = (time.monotonic(), answer, config)
            self._inflight.pop(model, None)
        return answer


def model_dir_problem(model_dir: Path) -> str | None:
    """The same checks on downloaded files, plus what needs them: the tokenizer must fit the
    embedding (a token id beyond vocab_size crashes the first forward pass)."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        return f"model directory {model_dir} has no config.json"
    config = json.loads(cfg_path.read_text())
    problem = config_problem(config)
    if problem:
        return problem
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        return f"cannot load the model's tokenizer: {type(exc).__name__}: {exc}"
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if vocab and len(tokenizer) > vocab:
        return (f"vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but the model's "
                f"embedding has {vocab} rows")
    return None
