"""Fetching a job's inputs: the presigned dataset (size-capped, must be a JSON array of
objects) and the base model (a local directory, or an HF id snapshot-downloaded to a cache)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx


class InputError(ValueError):
    """A job input that cannot be used; the message is the job's failure reason."""


def download_dataset(url: str, dest: Path, max_bytes: int, timeout_s: float = 60.0) -> list:
    """Streams `url` to `dest`, refusing anything over `max_bytes` before it is all read,
    and returns the parsed rows. Local paths and file:// URLs are accepted for operators."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("file://") or Path(url).exists():
        src = Path(url.removeprefix("file://"))
        if not src.is_file():
            raise InputError(f"dataset file {src} does not exist")
        if src.stat().st_size > max_bytes:
            raise InputError(f"dataset is {src.stat().st_size} bytes, over the {max_bytes}-byte cap")
        dest.write_bytes(src.read_bytes())
    else:
        _stream(url, dest, max_bytes, timeout_s)
    return parse_rows(dest)


def _stream(url: str, dest: Path, max_bytes: int, timeout_s: float) -> None:
    tmp = dest.with_suffix(".part")
    try:
        with httpx.stream("GET", url, timeout=httpx.Timeout(timeout_s), follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise InputError(f"dataset download failed: HTTP {resp.status_code} from {_redact(url)}")
            declared = int(resp.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise InputError(f"dataset is {declared} bytes, over the {max_bytes}-byte cap")
            size = 0
            with open(tmp, "wb") as f:
                for chunk in resp.iter_bytes(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise InputError(f"dataset exceeds the {max_bytes}-byte cap; download aborted")
                    f.write(chunk)
    except httpx.HTTPError as exc:
        raise InputError(f"dataset download failed: {type(exc).__name__}: {exc}") from exc
    tmp.replace(dest)


def _redact(url: str) -> str:
    return url.split("?", 1)[0]  # presigned query strings carry credentials


def parse_rows(path: Path) -> list:
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"dataset is not valid UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"dataset is not JSON ({exc.msg} at line {exc.lineno}); expected one JSON array") from exc
    if not isinstance(rows, list):
        raise InputError(f"dataset is a JSON {type(rows).__name__}, expected an array of records")
    if not rows:
        raise InputError("dataset is an empty array")
    return rows


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
    return Path(path)
