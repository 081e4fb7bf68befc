"""The deadline-first queue: every promise (queued job or reserved offer) placed on the GPU
ledger's timeline in order of deadline, earliest first.

Admission inserts a candidate and re-places the queue: it is accepted only if it and every job
that was on time before still finish on time. Dispatch starts the jobs whose placement begins
now. Everything here is in memory and Ray-free (the simulator runs the same code); the control
plane persists each change in the SQLite store, and `load()` rebuilds the queue after a restart.
"""
from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass, field

from cluster.plan import Plan
from cluster.planning.ledger import RESERVATION_TTL_S, ClusterView, Hold, Ledger

JOB, OFFER = "job", "offer"
MIN_LATE_TRAIN_S = 60.0   # a job pushed late (an anomaly) still runs if this much training fits


@dataclass
class Item:
    """An accepted promise not yet running: a queued job, or an offer's reservation."""
    task_id: str
    plan: Plan
    deadline: float
    kind: str = JOB
    expires_at: float | None = None
    node_hint: str | None = None   # where admission placed it: kept on ties, so re-plans stay stable

    @property
    def units(self) -> int:
        return self.plan.gpus or 1   # CPU mode: one worker slot per job


@dataclass(frozen=True)
class Placement:
    task_id: str
    node_id: str | None
    start: float
    end: float
    on_time: bool          # the window holds the plan's minimum
    runnable: bool = False  # the window holds at least the overheads: late, but it can still publish


@dataclass
class Outcome:
    """Result of trying to admit one candidate."""
    plan: Plan | None
    placement: Placement | None
    earliest: float | None = None   # best start seen when declined for time


@dataclass
class Scheduler:
    view: ClusterView
    reservation_ttl_s: float = RESERVATION_TTL_S
    ledger: Ledger = field(init=False)
    queue: dict[str, Item] = field(default_factory=dict)

    def __post_init__(self):
        self.ledger = Ledger(self.view)
        self.lock = threading.RLock()
        self._late: dict[str, float] | None = None   # cached: late items -> their window now
        self._admitted: tuple | None = None

    # state changes ----------------------------------------------------------
    def set_view(self, view: ClusterView) -> None:
        with self.lock:
            self.view = self.ledger.view = view
            self._late = None

    def add(self, item: Item) -> None:
        with self.lock:
            # the item try_admit just accepted changes nobody's lateness: keep the cache
            keep = self._admitted == (item.task_id, item.plan, item.deadline) and item.task_id not in self.queue
            self.queue[item.task_id] = item
            if not keep:
                self._late = None
            self._admitted = None

    def start(self, task_id: str, node_id: str, start: float, end: float, units: int) -> None:
        with self.lock:
            self.queue.pop(task_id, None)
            self.ledger.hold(Hold(task_id, node_id, units, start, end))
            self._late = None

    def finish(self, task_id: str) -> None:
        with self.lock:
            self.queue.pop(task_id, None)
            self.ledger.release(task_id)
            self._late = None

    def expire(self, now: float) -> list[str]:
        """Drops reservations whose training request never came."""
        with self.lock:
            gone = [t for t, i in self.queue.items() if i.kind == OFFER and (i.expires_at or 0) <= now]
            for t in gone:
                del self.queue[t]
            if gone:
                self._late = None
            return gone

    # planning ---------------------------------------------------------------
    def place_all(self, items: list[Item], now: float) -> list[Placement]:
        """EDF list scheduling: in deadline order, each item on the node of its GPU type where
        enough devices free up first (ties: the first node, so small jobs pack side by side).
        An item placed late gets a shorter window: min(target, deadline - start)."""
        tl = self.timeline(now)
        return [_place(item, tl) for item in sorted(items, key=_edf)]

    def timeline(self, now: float) -> "Timeline":
        return Timeline(self.ledger.free_times(now), self.view, now)

    def late(self, now: float) -> dict[str, float]:
        """Items that cannot get their minimum window in the current schedule, with the window
        they do get (a new job may not shrink it further)."""
        with self.lock:
            if self._late is None:
                self._late = {p.task_id: p.end - p.start for p in self.place_all(list(self.queue.values()), now)
                              if not p.on_time}
            return self._late

    def try_admit(self, task_id: str, options: list[Plan], deadline: float, now: float,
                  kind: str = OFFER) -> Outcome:
        """Of the options (shapes, preferred first), the one finishing first that is on time
        without making any currently on-time promise late; stops at the first that starts now."""
        with self.lock:
            already_late = self.late(now)
            earliest, best = None, None
            # Items due before the candidate are placed the same with or without it (EDF):
            # place them once, then try each option on a copy.
            key = (deadline, task_id)
            items = sorted((i for i in self.queue.values() if i.task_id != task_id), key=_edf)
            prefix = [i for i in items if _edf(i) < key]
            suffix = items[len(prefix):]
            base = self.timeline(now)
            for item in prefix:
                _place(item, base)
            for plan in options:
                cand = Item(task_id, plan, deadline, kind, now + self.reservation_ttl_s if kind == OFFER else None)
                tl = base.copy()
                mine = _place(cand, tl)
                if mine.node_id is not None:
                    earliest = mine.start if earliest is None else min(earliest, mine.start)
                if not mine.on_time:
                    continue
                if all(p.on_time or (p.task_id in already_late and p.end - p.start >= already_late[p.task_id] - 1)
                       for p in (_place(i, tl) for i in suffix)):
                    if best is None or (mine.end, mine.start) < (best[1].end, best[1].start):
                        best = (plan, mine)
                    if mine.start <= now:
                        break
            if best:
                self._admitted = (task_id, best[0], deadline)
                return Outcome(best[0], best[1])
            return Outcome(None, None, earliest)

    def due(self, now: float) -> list[tuple[Item, Placement]]:
        """Queued jobs (not reservations) whose placement starts now, in deadline order."""
        with self.lock:
            placed = self.place_all(list(self.queue.values()), now)
            return [(self.queue[p.task_id], p) for p in placed
                    if p.runnable and p.start <= now and self.queue[p.task_id].kind == JOB]

    def next_jobs(self, now: float, k: int = 2) -> list[Item]:
        """Hook for prefetch: the next queued jobs to start, whose data and model can download
        while others train."""
        with self.lock:
            placed = sorted(self.place_all(list(self.queue.values()), now), key=lambda p: p.start)
            return [self.queue[p.task_id] for p in placed if self.queue[p.task_id].kind == JOB][:k]

    def busy_until(self, now: float) -> float:
        """When the last promise ends (for messages)."""
        ends = [h.end for h in self.ledger.holds.values()]
        ends += [p.end for p in self.place_all(list(self.queue.values()), now) if p.node_id]
        return max(ends, default=now)


def _edf(item: Item) -> tuple[float, str]:
    return item.deadline, item.task_id


class Timeline:
    """Per node, the sorted times its devices free up; per (GPU type, device count) a lazy
    min-heap of when that many devices are free on each node, so placing an item costs
    O(log nodes) instead of a scan (the offer path must stay in milliseconds at 1,000 GPUs)."""

    def __init__(self, free: dict[str, list[float]], view: ClusterView | None, now: float,
                 heaps: dict | None = None, types: dict | None = None):
        self.free, self.now = free, now
        self.types = types if types is not None else {
            t: [n.node_id for n in ns] for t, ns in view.by_type().items()}
        self.heaps = heaps if heaps is not None else {}

    def copy(self) -> "Timeline":
        return Timeline({k: v[:] for k, v in self.free.items()}, None, self.now,
                        {k: h[:] for k, h in self.heaps.items()}, self.types)

    def earliest(self, gpu_type: str, g: int) -> tuple[float, str] | None:
        heap = self.heaps.get((gpu_type, g))
        if heap is None:
            heap = [(max(self.now, self.free[nid][g - 1]), i, nid)
                    for i, nid in enumerate(self.types.get(gpu_type, ())) if len(self.free[nid]) >= g]
            heapq.heapify(heap)
            self.heaps[(gpu_type, g)] = heap
        while heap:
            t, i, nid = heap[0]
            current = max(self.now, self.free[nid][g - 1])
            if current == t:
                return t, nid
            heapq.heapreplace(heap, (current, i, nid))  # free times only grow: refresh and retry
        return None

    def occupy(self, node_id: str, g: int, end: float) -> None:
        slots = self.free[node_id]
        slots[:g] = [end] * g
        slots.sort()


def _place(item: Item, tl: Timeline) -> Placement:
    found = tl.earliest(item.plan.gpu_type, item.units)
    if found is None:
        return Placement(item.task_id, None, tl.now, tl.now, False)
    start, node_id = found
    hinted = tl.free.get(item.node_hint)
    if hinted and len(hinted) >= item.units and max(tl.now, hinted[item.units - 1]) <= start:
        node_id = item.node_hint
    window = min(item.plan.target_s, item.deadline - start)
    end = start + max(window, 0.0)
    runnable = window >= min(item.plan.min_s, item.plan.overhead_s + MIN_LATE_TRAIN_S)  # on time ⇒ runnable
    if runnable:  # one that cannot even publish in time holds nothing: it will be failed
        tl.occupy(node_id, item.units, end)
    return Placement(item.task_id, node_id, start, end, window >= item.plan.min_s, runnable)


def restore(scheduler: Scheduler, store, now: float, plan_for) -> None:
    """Rebuilds the queue and the holds from the store after a restart: dispatched jobs hold
    their node until their planned end, queued jobs and live reservations queue again.
    `plan_for(job)` plans jobs stored before plans were (older databases)."""
    from cluster.state.store import ACTIVE, QUEUED

    for job in store.list_jobs(ACTIVE):
        plan = job.plan if job.plan is not None and job.plan.method else plan_for(job)
        if plan is None:
            continue
        if job.started_at and job.plan is not None and job.plan.node_id:
            scheduler.start(job.task_id, job.plan.node_id, job.started_at, job.plan.planned_end or job.deadline,
                            plan.gpus or 1)
        elif job.status == QUEUED:
            scheduler.add(Item(job.task_id, plan, job.deadline, JOB))
    for offer in store.reserved_offers(now):
        scheduler.add(Item(offer.task_id, offer.plan, offer.created_at + offer.hours_to_complete * 3600,
                           OFFER, offer.expires_at))
