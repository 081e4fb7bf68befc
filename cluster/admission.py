"""Offer admission: a simple capability rule (the capacity-planning brain is issue #6).

Accept only what we can finish: a task type we have a trainer for, a time budget inside our
bounds, and a model small enough for the hardware this miner trains on.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .protocol import TaskType
from .settings import Settings

SUPPORTED_TASK_TYPES = {TaskType.INSTRUCTTEXTTASK, TaskType.CHATTASK, TaskType.DPOTASK}
# Without a GPU, only tiny models train in useful time.
CPU_MAX_PARAMS = 300_000_000
GPU_MAX_PARAMS = 9_000_000_000


@dataclass(frozen=True)
class Decision:
    accepted: bool
    message: str


def params_from_name(model: str) -> int | None:
    """G.O.D's fallback: the `(\\d+)[bB]` in the model name, in billions."""
    m = re.search(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", model)
    return int(float(m.group(1)) * 1e9) if m else None


def model_is_usable(model: str, cache_dir: Path | None = None) -> str | None:
    """None when the model reference can be resolved and loads without remote code, else why not.
    The config is read when it is here already (a local directory or the hub cache): an offer
    must be answered within 3 s, so nothing is downloaded."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            return f"{model} has no config.json"
        return _config_problem(local / "config.json")
    if re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", model):
        cached = sorted((cache_dir or Path("/nonexistent")).glob(f"models--{model.replace('/', '--')}/snapshots/*/config.json"))
        return _config_problem(cached[-1]) if cached else None
    return f"model {model!r} is neither a local model directory nor a Hugging Face id"


def _config_problem(path: Path) -> str | None:
    from trainers.families import unsupported_reason

    try:
        return unsupported_reason(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        return f"unreadable config.json: {exc}"


def decide(task_type: TaskType, model: str, hours: float, params: int | None, settings: Settings) -> Decision:
    if task_type not in SUPPORTED_TASK_TYPES:
        names = ", ".join(sorted(t.value for t in SUPPORTED_TASK_TYPES))
        return Decision(False, f"declined: task type {task_type.value} is not supported (supported: {names})")
    if hours < settings.min_hours:
        return Decision(False, f"declined: {hours} h is too short to train and publish (minimum {settings.min_hours} h)")
    if hours > settings.max_hours:
        return Decision(False, f"declined: {hours} h is longer than this miner plans ahead ({settings.max_hours} h)")
    problem = model_is_usable(model, settings.model_cache_dir)
    if problem:
        return Decision(False, f"declined: {problem}")
    params = params or params_from_name(model)
    limit = GPU_MAX_PARAMS if settings.use_gpu else CPU_MAX_PARAMS
    if params and params > limit:
        return Decision(False, f"declined: {params / 1e9:.1f}B parameters is over this miner's {limit / 1e9:.1f}B limit")
    return Decision(True, f"accepted: {task_type.value} on {model} in {hours} h")
