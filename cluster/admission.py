"""Offer admission: a simple capability rule (the capacity-planning brain is issue #6).

Accept only what we can finish: a task type we have a trainer for, a time budget inside our
bounds, and a model small enough for the hardware this miner trains on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .protocol import TaskType
from .settings import Settings

SUPPORTED_TASK_TYPES = {TaskType.INSTRUCTTEXTTASK, TaskType.GRPOTASK}
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


def model_is_usable(model: str) -> str | None:
    """None when the model reference can be resolved, else why not."""
    if Path(model).expanduser().is_dir():
        return None if (Path(model).expanduser() / "config.json").exists() else f"{model} has no config.json"
    if re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", model):
        return None
    return f"model {model!r} is neither a local model directory nor a Hugging Face id"


def decide(task_type: TaskType, model: str, hours: float, params: int | None, settings: Settings) -> Decision:
    if task_type not in SUPPORTED_TASK_TYPES:
        names = ", ".join(sorted(t.value for t in SUPPORTED_TASK_TYPES))
        return Decision(False, f"declined: task type {task_type.value} is not supported (supported: {names})")
    if hours < settings.min_hours:
        return Decision(False, f"declined: {hours} h is too short to train and publish (minimum {settings.min_hours} h)")
    if hours > settings.max_hours:
        return Decision(False, f"declined: {hours} h is longer than this miner plans ahead ({settings.max_hours} h)")
    problem = model_is_usable(model)
    if problem:
        return Decision(False, f"declined: {problem}")
    params = params or params_from_name(model)
    limit = GPU_MAX_PARAMS if settings.use_gpu else CPU_MAX_PARAMS
    if params and params > limit:
        return Decision(False, f"declined: {params / 1e9:.1f}B parameters is over this miner's {limit / 1e9:.1f}B limit")
    return Decision(True, f"accepted: {task_type.value} on {model} in {hours} h")
