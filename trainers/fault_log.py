"""Worker failures survived by a Ray Train run, and the wall time each one cost.

A `ray.train.UserCallback` that runs in the Train controller: it notes the last checkpointed
report, each worker-group failure, and the first report after the restart. The time lost is
the extra wall time against an uninterrupted run: from the checkpoint the run resumed from to
the first report after resuming, less the time the steps in between take normally.
A rerun of the same run (driver or cluster restart) counts as one failure too. The log is a
JSON file in the run's storage folder, which also survives the restarts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ray.train import UserCallback

from .paths import CHECKPOINT_GLOB, CHECKPOINT_METRICS


class FaultLog(UserCallback):
    def __init__(self, run_path: Path):
        self.path = str(Path(run_path) / "faults.json")
        self.faults: list[dict] = self.read()
        self._start = time.time()
        self._reports: list[tuple[float, int]] = []       # (time, step) of reports in this process
        self._rate: float | None = None                   # seconds per step, from the trainer's own clock
        self._checkpoint: tuple[float, int] = (self._start, 0)
        previous = _newest_checkpoint(Path(run_path))
        if previous is not None:  # fit() rerun on a run that has checkpoints: a restore
            self._checkpoint = previous
            self.faults.append({"kind": "run_restored", "at": self._start, "checkpoint_step": previous[1],
                                "checkpoint_at": previous[0], "sec_per_step": None})

    def read(self) -> list[dict]:
        try:
            return json.loads(Path(self.path).read_text())
        except (OSError, ValueError):
            return []

    def after_report(self, run_context, metrics, checkpoint):
        now, step = time.time(), int((metrics[0] if metrics else {}).get("step") or 0)
        pending = self.faults[-1] if self.faults and "time_lost_s" not in self.faults[-1] else None
        if pending is not None:
            redo = max(0, step - (pending["checkpoint_step"] or 0))
            normal = redo * (pending["sec_per_step"] or self._sec_per_step(now, step) or 0.0)
            pending.update(resumed_step=step, time_lost_s=round(max(0.0, now - pending["checkpoint_at"] - normal), 2))
            self._write()
        self._reports.append((now, step))
        elapsed = (metrics[0] if metrics else {}).get("elapsed_s")
        if elapsed and step and not self.faults:  # first attempt: the trainer's clock started at step 0
            self._rate = float(elapsed) / step
        if checkpoint is not None:
            self._checkpoint = (now, step)

    def after_exception(self, run_context, worker_exceptions):
        error = next(iter(worker_exceptions.values()), None)
        self.faults.append({"kind": "worker_failure", "at": time.time(), "error": f"{type(error).__name__}: {error}"[:300],
                            "checkpoint_step": self._checkpoint[1], "checkpoint_at": self._checkpoint[0],
                            "sec_per_step": self._sec_per_step()})
        self._reports.clear()  # step times after the restart are measured afresh
        self._write()

    def _sec_per_step(self, now: float | None = None, step: int | None = None) -> float | None:
        points = self._reports + ([(now, step)] if now is not None else [])
        if len(points) >= 2 and points[-1][1] > points[0][1]:
            return (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])
        return self._rate

    def _write(self) -> None:
        tmp = Path(self.path + ".tmp")
        tmp.write_text(json.dumps(self.faults, indent=1))
        tmp.replace(self.path)


def _newest_checkpoint(run_path: Path) -> tuple[float, int] | None:
    """(time, step) of the checkpoint a rerun resumes from: the latest one Ray Train registered
    (its checkpoint manager snapshot; a checkpoint persisted by a worker that died before the
    controller saw the report is not used), else the newest saved step."""
    snapshot = run_path / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        return snapshot.stat().st_mtime, int(latest["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    best = None
    for metrics in run_path.glob(f"{CHECKPOINT_GLOB}/{CHECKPOINT_METRICS}"):
        try:
            step = int(json.loads(metrics.read_text()).get("step") or 0)
        except (OSError, ValueError):
            continue
        if best is None or step > best[1]:
            best = (metrics.stat().st_mtime, step)
    return best
