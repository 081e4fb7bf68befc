"""The miner's Prometheus metrics, recorded with `ray.util.metrics`.

Ray's metrics agent on each node exports them on the node's metrics export port with a `ray_`
prefix (counters also get `_total`); `dashboards/grafana.json` charts them. Recording is a
no-op outside a Ray worker or driver (unit tests, `miner jobs`), and never raises: an
operator's metric must not fail an offer or a training job.

Where they are recorded: offers in the control plane, jobs-by-state in the Serve replica's
reconcile loop, training (loss, tokens/s, deadline slack, GPU hours) by `TrainingMonitor`
in the job driver, which tails the progress file rank 0 writes (trainers/progress.py).
"""
from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

log = logging.getLogger("miner.metrics")

# name -> (kind, description, tag keys). Names as exported: "ray_" + name (+ "_total" for counters).
METRICS = {
    "miner_offers": ("counter", "Task offers answered, by decision and reason", ("decision", "reason")),
    "miner_offer_latency_seconds": ("histogram", "Time to decide a task offer", ("decision",)),
    "miner_jobs": ("gauge", "Jobs in the store, by state", ("state",)),
    "miner_training_tokens_per_second": ("gauge", "Training throughput of a running job", ("task_id", "task_type")),
    "miner_training_loss": ("gauge", "Latest train and dev loss of a job (validator metric)", ("task_id", "split")),
    "miner_deadline_slack_seconds": ("gauge", "Deadline minus projected (training) or actual (published) finish",
                                     ("task_id", "phase")),
    "miner_gpu_hours": ("counter", "Accelerator-hours held by training workers (device=cpu on CPU-only nodes)",
                        ("task_type", "device")),
}
LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]

# Offer reasons as a small fixed set (a metric tag must not carry free text).
_REASONS = [("task type", "unsupported_task_type"), ("too short", "too_short"), ("longer than", "too_long"),
            ("parameters is over", "model_too_large"), ("model", "model_unusable"),
            ("capacity", "no_capacity"), ("queue", "queue_full"), ("image", "image")]

_lock = threading.Lock()
_objects: dict = {}


def exported_names() -> list[str]:
    """The names each metric has on the Prometheus endpoint (one sample name per metric)."""
    suffix = {"counter": "_total", "histogram": "_count", "gauge": ""}
    return [f"ray_{name}{suffix[kind]}" for name, (kind, _, _) in METRICS.items()]


def _metric(name: str):
    """The ray.util.metrics object for `name`, created once per process; None outside Ray."""
    with _lock:
        if name in _objects:
            return _objects[name]
        try:
            import ray
            from ray.util import metrics as m

            if not ray.is_initialized():
                return None
            kind, desc, tags = METRICS[name]
            if kind == "counter":
                obj = m.Counter(name, description=desc, tag_keys=tags)
            elif kind == "gauge":
                obj = m.Gauge(name, description=desc, tag_keys=tags)
            else:
                obj = m.Histogram(name, description=desc, boundaries=LATENCY_BOUNDARIES, tag_keys=tags)
        except Exception:  # no Ray, or a metrics backend problem: metrics are best effort
            log.debug("metric %s unavailable", name, exc_info=True)
            return None
        _objects[name] = obj
        return obj


def _record(name: str, method: str, value: float, tags: dict) -> None:
    obj = _metric(name)
    if obj is None:
        return
    try:
        getattr(obj, method)(value, tags={k: str(v) for k, v in tags.items()})
    except Exception:
        log.debug("could not record %s", name, exc_info=True)


def offer_reason(accepted: bool, message: str) -> str:
    if accepted:
        return "accepted"
    text = message.lower()
    return next((code for needle, code in _REASONS if needle in text), "other")


def record_offer(accepted: bool, message: str, seconds: float) -> None:
    decision = "accepted" if accepted else "declined"
    _record("miner_offers", "inc", 1.0, {"decision": decision, "reason": offer_reason(accepted, message)})
    _record("miner_offer_latency_seconds", "observe", seconds, {"decision": decision})


def record_jobs_by_state(store) -> dict[str, int]:
    """Sets the jobs gauge for every state (0 included, so finished states drop back)."""
    from cluster.state.store import ACTIVE, TERMINAL

    counts = {state: 0 for state in (*ACTIVE, *TERMINAL)}
    for job in store.list_jobs():
        counts[job.status] = counts.get(job.status, 0) + 1
    for state, n in counts.items():
        _record("miner_jobs", "set", float(n), {"state": state})
    return counts


def record_final_slack(task_id: str, deadline: float) -> None:
    _record("miner_deadline_slack_seconds", "set", deadline - time.time(), {"task_id": task_id, "phase": "published"})


def projected_slack(progress: dict, deadline: float, now: float | None = None) -> float:
    """Deadline minus the projected end of training at the current step rate."""
    now = now or time.time()
    step, total, elapsed = progress.get("step", 0), progress.get("total", 0), progress.get("elapsed_s", 0.0)
    per_step = elapsed / step if step else 0.0
    return deadline - (now + max(0, total - step) * per_step)


class TrainingMonitor:
    """A thread in the job driver that turns the trainer's progress file into metrics:
    loss (train, dev), tokens/s, projected deadline slack and GPU-hours (by elapsed time)."""

    def __init__(self, progress_file: Path, task_id: str, task_type: str, deadline: float,
                 interval_s: float = 2.0):
        self.path, self.task_id, self.task_type, self.deadline = Path(progress_file), task_id, task_type, deadline
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="miner-metrics", daemon=True)
        self._counted_s = 0.0  # worker-seconds already added to the GPU-hours counter
        self._seen_start: float | None = None

    def __enter__(self) -> "TrainingMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last progress the trainer wrote

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> dict | None:
        from trainers.progress import read_progress

        p = read_progress(self.path)
        if not p:
            return None
        tid = {"task_id": self.task_id}
        if p.get("started_at") != self._seen_start:  # a restarted run counts from zero again
            self._seen_start, self._counted_s = p.get("started_at"), 0.0
        _record("miner_training_loss", "set", p["loss"], {**tid, "split": "train"})
        if p.get("dev_loss") is not None:
            _record("miner_training_loss", "set", p["dev_loss"], {**tid, "split": "dev"})
        _record("miner_training_tokens_per_second", "set", p.get("tokens_per_s", 0.0),
                {**tid, "task_type": self.task_type})
        _record("miner_deadline_slack_seconds", "set", projected_slack(p, self.deadline),
                {**tid, "phase": "training"})
        worker_s = p.get("elapsed_s", 0.0) * p.get("world_size", 1)
        if worker_s > self._counted_s:
            device = "gpu" if p.get("device") == "cuda" else re.sub(r"\W", "", str(p.get("device", "cpu")))
            _record("miner_gpu_hours", "inc", (worker_s - self._counted_s) / 3600,
                    {"task_type": self.task_type, "device": device})
            self._counted_s = worker_s
        return p
