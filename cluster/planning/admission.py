"""Offer admission: accept only what we can finish before the deadline, given the queue.

A decision is made from memory in milliseconds: the task type and model family are checked,
the capacity planner gives the job's shapes and durations (scaled by measured throughput from
the knowledge base), and the deadline-first queue says whether one of those shapes can start
soon enough on the GPUs the ledger sees, without making any accepted job late. Every decline
says why: unsupported type/family, too big for the cluster, not enough time, or busy until T.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.plan import Plan
from cluster.planning import capacity
from cluster.planning.capacity import Timing
from cluster.planning.knowledge import Advice, Knowledge, family_of, needs_remote_code
from cluster.planning.scheduling import OFFER, Placement, Scheduler
from cluster.protocol.wire import TaskType

# Task types with a trainer; other helpers add theirs here. The planner sizes all of PLANNABLE.
SUPPORTED_TASK_TYPES = {TaskType.INSTRUCTTEXTTASK, TaskType.CHATTASK, TaskType.DPOTASK, TaskType.GRPOTASK}
PLANNABLE = {TaskType.INSTRUCTTEXTTASK, TaskType.CHATTASK, TaskType.DPOTASK, TaskType.GRPOTASK}
UNKNOWN_SIZE_PARAMS = 8_000_000_000   # no count, config or size in the name: plan for a typical 8 B
MAX_OPTIONS = 4                        # shapes tried per offer (keeps decisions in milliseconds)


@dataclass(frozen=True)
class Request:
    task_id: str
    task_type: TaskType
    model: str
    hours: float
    params: int | None = None
    config: dict | None = None        # the model's config.json when it is on disk


@dataclass(frozen=True)
class Decision:
    accepted: bool
    message: str
    plan: Plan | None = None
    placement: Placement | None = None


@dataclass(frozen=True)
class Limits:
    min_hours: float = 0.02
    max_hours: float = 48.0
    cpu_workers: int = 1
    cpus_per_worker: float = 1.0


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


@dataclass(frozen=True)
class Facts:
    """What one request is, gathered once before planning: the model's family and size, and
    what the knowledge base says about that family (its record read once, not per step)."""
    family: str | None
    params: int
    advice: Advice

    def size(self, task_type: TaskType) -> str:
        return f"{self.params / 1e9:.1f}B {task_type.value}"


class Admission:
    """Reads the scheduler (ledger + queue) and the knowledge base; changes nothing itself.

    One request is a straight pipeline: facts (config, size, family record) -> options (the
    capacity planner's shapes) -> placement (the deadline-first queue) -> decision and message."""

    def __init__(self, scheduler: Scheduler, knowledge: Knowledge | None = None, limits: Limits | None = None,
                 supported: set[TaskType] | None = None, timing: Timing | None = None):
        self.scheduler = scheduler
        self.knowledge = knowledge or Knowledge()
        self.limits = limits or Limits()
        self.supported = SUPPORTED_TASK_TYPES if supported is None else supported
        self.timing = timing

    def decide(self, req: Request, now: float | None = None, kind: str = OFFER) -> Decision:
        now = time.time() if now is None else now
        facts, problem = self.facts(req)
        if problem:
            return Decision(False, f"declined: {problem}")
        options, why_not = self.options(req.task_type.value, facts.params, facts.advice)
        if not options:
            return Decision(False, f"declined: {why_not}")
        budget = req.hours * 3600
        fitting = [p for p in options if p.min_s <= budget]
        size = facts.size(req.task_type)
        if not fitting:
            need = min(p.min_s for p in options)
            return Decision(False, f"declined: not enough time: a {size} needs ≥ {capacity.hours(need)} "
                                   f"(download, tuning, training, save, upload, margin); offered {req.hours} h")
        out = self.scheduler.try_admit(req.task_id, fitting[:MAX_OPTIONS], now + budget, now, kind)
        if out.plan is None:
            return Decision(False, self._busy_message(size, fitting[0], out.earliest, now, budget))
        p, where = out.plan, out.placement
        shape = f"{p.gpus}×{p.gpu_type}" if p.gpus else f"{p.workers} CPU worker(s)"
        wait = "now" if where.start <= now + 1 else f"at {_clock(where.start)}"
        return Decision(True, f"accepted: {size} on {req.model}, {p.method} on {shape}, starting {wait}, "
                              f"done by {_clock(where.end)} (deadline {_clock(now + budget)})", p, where)

    def facts(self, req: Request) -> tuple[Facts | None, str | None]:
        """(facts, None), or (None, why the request is declined before any planning)."""
        if req.task_type not in self.supported or req.task_type not in PLANNABLE:
            names = ", ".join(sorted(t.value for t in self.supported))
            return None, f"task type {req.task_type.value} is not supported (supported: {names})"
        if req.hours < self.limits.min_hours:
            return None, f"{req.hours} h is too short to train and publish (minimum {self.limits.min_hours} h)"
        if req.hours > self.limits.max_hours:
            return None, f"{req.hours} h is longer than this miner plans ahead ({self.limits.max_hours} h)"
        problem = model_is_usable(req.model)
        if problem:
            return None, problem
        if needs_remote_code(req.config):
            return None, f"model family of {req.model} needs trust_remote_code, which the validator will not load"
        family = family_of(req.config)
        advice = self.knowledge.advice(family)
        if advice.blocked:
            return None, advice.blocked
        return Facts(family, self.params_of(req), advice), None

    def params_of(self, req: Request) -> int:
        return (req.params or (req.config and capacity.params_from_config(req.config))
                or params_from_name(req.model) or UNKNOWN_SIZE_PARAMS)

    def options(self, task_type: str, params: int, advice: Advice | None = None) -> tuple[list[Plan], str]:
        """Every shape this cluster could run the job in, fastest GPU type first; else why none.
        `advice`: the family's record (default: no family, i.e. all families' measurements)."""
        view = self.scheduler.view
        advice = advice or self.knowledge.advice(None)
        kinds = sorted(view.by_type().items(), key=lambda kv: -capacity.device(kv[0]).speed)
        out: list[Plan] = []
        for gpu_type, nodes in kinds:
            base = self.timing or (capacity.CPU_TIMING if gpu_type == "CPU" else capacity.GPU_TIMING)
            out += capacity.plan_options(params, task_type, gpu_type, max(n.gpus for n in nodes),
                                         cpu_workers=self.limits.cpu_workers,
                                         cpus_per_worker=self.limits.cpus_per_worker, speedup=advice.speedup,
                                         timing=advice.timing(base))
        if out:
            return out, ""
        return [], (f"too big for the cluster: {params / 1e9:.1f}B parameters is over what one node's memory "
                    f"holds for {task_type} ({view.describe()})")

    def _busy_message(self, size: str, plan: Plan, earliest: float | None, now: float, budget: float) -> str:
        shape = f"{plan.gpus}×{plan.gpu_type}" if plan.gpus else "a CPU slot"
        if earliest is None:
            return (f"declined: busy until {_clock(self.scheduler.busy_until(now))} (no capacity): no {shape} "
                    f"is free for this job")
        left = max(0.0, now + budget - earliest)
        return (f"declined: busy until {_clock(earliest)} (no capacity before then): the first {shape} frees then, leaving "
                f"{capacity.hours(left)} of the {capacity.hours(budget)} budget; a {size} needs ≥ "
                f"{capacity.hours(plan.min_s)}")


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(t))
