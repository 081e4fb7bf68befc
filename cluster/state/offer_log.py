"""Offer decisions, written behind the answer.

An offer must be answered within the validator's 3 s however busy the miner is, and one
synchronous SQLite commit (an fsync, ~5 ms here) per offer would cap the miner near 200 offers/s
and queue everything behind the disk. So decisions go to memory at once and to SQLite in
batches, one transaction every `flush_interval_s`. Readers see pending decisions too.

What a crash can lose: the last <= flush_interval_s of offer records. That is safe, because
start_training re-runs admission when it finds no offer record; only job records, which are
written synchronously, carry promises.
"""
from __future__ import annotations

import logging
import threading

from cluster.state.store import JobStore, Offer

log = logging.getLogger("miner.offers")


class OfferLog:
    def __init__(self, store: JobStore, flush_interval_s: float = 0.05):
        self.store = store
        self.flush_interval_s = flush_interval_s
        self._pending: dict[str, Offer] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="offer-log", daemon=True)
        self._thread.start()

    def record(self, offer: Offer) -> None:
        with self._lock:
            self._pending[offer.task_id] = offer

    def get(self, task_id: str) -> Offer | None:
        with self._lock:
            pending = self._pending.get(task_id)
        return pending or self.store.get_offer(task_id)

    def flush(self) -> None:
        with self._lock:
            batch = list(self._pending.values())
        if not batch:
            return
        self.store.record_offers(batch)
        with self._lock:  # drop only what was written; newer decisions for the same id stay pending
            for offer in batch:
                if self._pending.get(offer.task_id) is offer:
                    del self._pending[offer.task_id]

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval_s)
            try:
                self.flush()
            except Exception:  # the disk may come back; keep the decisions in memory meanwhile
                log.exception("writing offer decisions failed; will retry")

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.flush()
