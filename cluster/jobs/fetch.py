"""Fetching a job's inputs: the presigned dataset (streamed under a size cap, a per-read timeout
and a total deadline, then parsed as one JSON array of objects) and the base model (a local
directory, or an HF id snapshot-downloaded to a cache).

Every failure is an `InputError` whose message is the job's readable failure reason; the URL's
query string (the presigned credentials) never appears in it."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from cluster.planning.dataset_checks import InputError


@dataclass(frozen=True)
class FetchLimits:
    """How long and how much a dataset download may take. The read timeout catches a server
    that stops sending; the total deadline catches one that sends a byte now and then."""
    max_bytes: int
    connect_timeout_s: float = 15.0
    read_timeout_s: float = 60.0
    total_timeout_s: float = 900.0
    retries: int = 2             # for 5xx / 429 / connection errors only
    backoff_s: float = 1.0


_RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class _Transient(Exception):
    """A failure worth another try (the message is the reason if the tries run out)."""


PREFETCH_DIR = "prefetch"


def prefetched_path(dest: Path) -> Path:
    """Where cluster/jobs/prefetch.py leaves the dataset of a job queued next (whole or absent:
    downloads land by an atomic rename)."""
    return dest.parent / PREFETCH_DIR / dest.name


def download_dataset(url: str, dest: Path, max_bytes: int, timeout_s: float = 60.0,
                     limits: FetchLimits | None = None) -> list:
    """Streams `url` to `dest`, refusing anything over the cap before it is all read, and
    returns the parsed rows. A copy prefetched while other jobs trained is used instead when
    there is one. Local paths and file:// URLs are accepted for operators."""
    limits = limits or FetchLimits(max_bytes=max_bytes, read_timeout_s=timeout_s)
    ready = prefetched_path(dest)
    if ready.is_file() and ready.stat().st_size <= limits.max_bytes:
        ready.replace(dest)
    else:
        fetch_file(url, dest, limits)
    return parse_rows(dest)


def fetch_file(url: str, dest: Path, limits: FetchLimits) -> None:
    """The download alone (no parsing): `dest` is whole afterwards, or absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("file://") or not url.startswith(("http://", "https://")):
        _copy_local(Path(url.removeprefix("file://")), dest, limits.max_bytes)
    else:
        _download_with_retries(url, dest, limits)


def _copy_local(src: Path, dest: Path, max_bytes: int) -> None:
    if not src.is_file():
        raise InputError(f"dataset file {src} does not exist")
    if src.stat().st_size > max_bytes:
        raise InputError(f"dataset is {src.stat().st_size} bytes, over the {max_bytes}-byte cap")
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(src.read_bytes())
    tmp.replace(dest)


def _download_with_retries(url: str, dest: Path, limits: FetchLimits) -> None:
    give_up_at = time.monotonic() + limits.total_timeout_s
    for attempt in range(limits.retries + 1):
        try:
            return _stream(url, dest, limits, give_up_at)
        except _Transient as exc:
            pause = limits.backoff_s * 2 ** attempt * (0.5 + random.random())
            if attempt == limits.retries or time.monotonic() + pause >= give_up_at:
                raise InputError(f"dataset download failed after {attempt + 1} tries: {exc}") from None
            time.sleep(pause)


def _stream(url: str, dest: Path, limits: FetchLimits, give_up_at: float) -> None:
    tmp = dest.with_suffix(".part")
    timeout = httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s)
    complete = False
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as resp:
            _check_status(resp, url)
            declared = int(resp.headers.get("content-length") or 0)
            if declared > limits.max_bytes:
                raise InputError(f"dataset is {declared} bytes, over the {limits.max_bytes}-byte cap")
            size = 0
            with open(tmp, "wb") as f:
                for chunk in resp.iter_bytes():  # no chunk size: yields as bytes arrive
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise InputError(f"dataset exceeds the {limits.max_bytes}-byte cap; download aborted")
                    if time.monotonic() > give_up_at:
                        raise InputError(f"dataset download took longer than {limits.total_timeout_s:g} s "
                                         f"({size} bytes received); aborted")
                    f.write(chunk)
            complete = True
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc or 'no detail'} ({_redact(url)})") from exc
    except httpx.ReadTimeout as exc:
        raise InputError(f"dataset download stalled: no data for {limits.read_timeout_s:g} s "
                         f"from {_redact(url)}") from exc
    except httpx.HTTPError as exc:
        raise InputError(f"dataset download failed: {type(exc).__name__}: {exc} ({_redact(url)})") from exc
    finally:
        if not complete:
            tmp.unlink(missing_ok=True)  # never leave a partial download behind
    tmp.replace(dest)


def _check_status(resp: httpx.Response, url: str) -> None:
    status = resp.status_code
    if status == 200:
        return
    where = _redact(url)
    if status in _RETRYABLE_STATUS:
        raise _Transient(f"HTTP {status} from {where}")
    if status == 403:
        body = resp.read()[:2000].decode("utf-8", "replace")
        why = "the presigned URL has expired" if "expired" in body.lower() else "access denied"
        raise InputError(f"dataset download failed: HTTP 403 ({why}) from {where}")
    raise InputError(f"dataset download failed: HTTP {status} from {where}")


def _redact(url: str) -> str:
    return url.split("?", 1)[0]  # presigned query strings carry credentials


def parse_rows(path: Path) -> list:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM is harmless; invalid bytes are not
    except UnicodeDecodeError as exc:
        raise InputError(f"dataset is not valid UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r})") from exc
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        if _looks_like_jsonl(text):
            raise InputError("dataset is JSON Lines (one object per line); expected one JSON array") from exc
        raise InputError(f"dataset is not JSON ({exc.msg} at line {exc.lineno}); expected one JSON array") from exc
    except RecursionError as exc:
        raise InputError("dataset JSON is nested too deeply to parse") from exc
    if not isinstance(rows, list):
        raise InputError(f"dataset is a JSON {type(rows).__name__}, expected an array of records")
    if not rows:
        raise InputError("dataset is an empty array")
    return rows


def _looks_like_jsonl(text: str) -> bool:
    lines = [ln for ln in text.splitlines()[:3] if ln.strip()]
    try:
        return len(lines) > 1 and all(isinstance(json.loads(ln), dict) for ln in lines)
    except (json.JSONDecodeError, RecursionError):
        return False


def resolve_model(model: str, cache_dir: Path, token: str | None = None) -> Path:
    """A local directory as is; otherwise the HF snapshot (weights, config, tokenizer)."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise InputError(f"model directory {local} has no config.json")
        return local.resolve()
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(model, cache_dir=str(cache_dir), token=token,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                 "tokenizer*"])
    except Exception as exc:
        raise InputError(f"cannot fetch base model {model!r}: {type(exc).__name__}: {exc}") from exc
    from cluster.state.cache import hf_cache_entry, touch

    touch(hf_cache_entry(cache_dir, model))  # most recently used: the last the cache evicts
    return Path(path)
