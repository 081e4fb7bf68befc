"""Live training progress: rank 0 rewrites one small JSON file while it trains.

The file is the one place operators' tools read a running job from (`miner jobs --watch`,
the job driver's metrics monitor), so the trainer needs no metrics or UI code. Writes are
atomic (temp file + rename) and throttled, so readers never see half a file.
"""
from __future__ import annotations

import json
import os
import time


class ProgressFile:
    def __init__(self, path: str, *, world_size: int, device: str, train_deadline: float,
                 min_interval_s: float = 1.0):
        self.path = path
        self.base = {"world_size": world_size, "device": device, "train_deadline": train_deadline,
                     "started_at": time.time()}
        self.min_interval_s = min_interval_s
        self._last_write = 0.0
        self._last_dev: float | None = None

    def update(self, entry: dict, total: int, final: bool = False) -> None:
        """Records one optimizer step's entry (step, loss, lr, tokens_per_s, elapsed_s, dev_loss)."""
        if not self.path:
            return
        if entry.get("dev_loss") is not None:
            self._last_dev = entry["dev_loss"]
        now = time.time()
        if not final and entry.get("dev_loss") is None and now - self._last_write < self.min_interval_s:
            return
        data = {**self.base, **{k: v for k, v in entry.items() if k != "dev_loss"}, "total": total,
                "dev_loss": self._last_dev, "done": final, "updated_at": now}
        tmp = f"{self.path}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)
        self._last_write = now


def read_progress(path) -> dict | None:
    """The last progress a trainer wrote, or None when there is none (yet)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
