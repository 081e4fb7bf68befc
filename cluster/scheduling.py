"""The deadline-first queue: every promise (queued job or reserved offer) placed on the GPU
ledger's timeline in order of deadline, earliest first.

Admission inserts a candidate and re-places the queue: it is accepted only if it and every job
that was on time before still finish on time. Dispatch starts the jobs whose placement begins
now. Everything here is in memory and Ray-free (the simulator runs the same code); the control
plane persists each change in the SQLite store, and `load()` rebuilds the queue after a restart.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .capacity import Plan
from .ledger import RESERVATION_TTL_S, ClusterView, Hold, Ledger

JOB, OFFER = "job", "offer"


@dataclass
class Item:
    """An accepted promise not yet running: a queued job, or an offer's reservation."""
    task_id: str
    plan: Plan
    deadline: float
    kind: str = JOB
    expires_at: float | None = None

    @property
    def units(self) -> int:
        return self.plan.gpus or 1   # CPU mode: one worker slot per job


@dataclass(frozen=True)
class Placement:
    task_id: str
    node_id: str | None
    start: float
    end: float
    on_time: bool


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
        self._late: set[str] | None = None   # cached: who is late in the current schedule

    # state changes ----------------------------------------------------------
    def set_view(self, view: ClusterView) -> None:
        with self.lock:
            self.view = self.ledger.view = view
            self._late = None

    def add(self, item: Item) -> None:
        with self.lock:
            self.queue[item.task_id] = item
            self._late = None

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
        enough devices free up first (first fit: small jobs pack onto one node side by side).
        An item placed late gets a shorter window: min(target, deadline - start)."""
        free = self.ledger.free_times(now)
        nodes = self.view.by_type()
        out = []
        for item in sorted(items, key=lambda i: (i.deadline, i.task_id)):
            out.append(_place(item, free, nodes.get(item.plan.gpu_type, ()), now))
        return out

    def late(self, now: float) -> set[str]:
        with self.lock:
            if self._late is None:
                self._late = {p.task_id for p in self.place_all(list(self.queue.values()), now) if not p.on_time}
            return self._late

    def try_admit(self, task_id: str, options: list[Plan], deadline: float, now: float,
                  kind: str = OFFER) -> Outcome:
        """Of the options (shapes, preferred first), the one finishing first that is on time
        without making any currently on-time promise late; stops at the first that starts now."""
        with self.lock:
            already_late = self.late(now)
            earliest, best = None, None
            for plan in options:
                cand = Item(task_id, plan, deadline, kind, now + self.reservation_ttl_s if kind == OFFER else None)
                placed = {p.task_id: p for p in self.place_all([*self.queue.values(), cand], now)}
                mine = placed[task_id]
                if mine.node_id is not None:
                    earliest = mine.start if earliest is None else min(earliest, mine.start)
                if mine.on_time and all(p.on_time or t in already_late for t, p in placed.items()):
                    if best is None or (mine.end, mine.start) < (best[1].end, best[1].start):
                        best = (plan, mine)
                    if mine.start <= now:
                        break
            return Outcome(best[0], best[1]) if best else Outcome(None, None, earliest)

    def due(self, now: float) -> list[tuple[Item, Placement]]:
        """Queued jobs (not reservations) whose placement starts now, in deadline order."""
        with self.lock:
            placed = self.place_all(list(self.queue.values()), now)
            return [(self.queue[p.task_id], p) for p in placed
                    if p.node_id is not None and p.start <= now and self.queue[p.task_id].kind == JOB]

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


def _place(item: Item, free: dict[str, list[float]], nodes, now: float) -> Placement:
    g = item.units
    best_node, best_start = None, None
    for node in nodes:
        slots = free[node.node_id]
        if len(slots) < g:
            continue
        start = max(now, slots[g - 1])
        if best_start is None or start < best_start:
            best_node, best_start = node.node_id, start
            if start <= now:
                break
    if best_node is None:
        return Placement(item.task_id, None, now, now, False)
    window = min(item.plan.target_s, item.deadline - best_start)
    end = best_start + max(window, 0.0)
    on_time = window >= item.plan.min_s
    if on_time:  # a late item holds nothing: it will be failed or re-planned, not run
        slots = free[best_node]
        slots[:g] = [end] * g
        slots.sort()
    return Placement(item.task_id, best_node, best_start, end, on_time)


def restore(scheduler: Scheduler, store, now: float, plan_for) -> None:
    """Rebuilds the queue and the holds from the store after a restart: dispatched jobs hold
    their node until their planned end, queued jobs and live reservations queue again.
    `plan_for(job)` plans jobs stored before plans were (older databases)."""
    from .store import ACTIVE, QUEUED

    for job in store.list_jobs(ACTIVE):
        plan_d = job.plan or {}
        plan = Plan.from_dict(plan_d) if "method" in plan_d else plan_for(job)
        if plan is None:
            continue
        if job.started_at and plan_d.get("node_id"):
            scheduler.start(job.task_id, plan_d["node_id"], job.started_at,
                            plan_d.get("planned_end", job.deadline), plan.gpus or 1)
        elif job.status == QUEUED:
            scheduler.add(Item(job.task_id, plan, job.deadline, JOB))
    for offer in store.reserved_offers(now):
        scheduler.add(Item(offer.task_id, Plan.from_dict(offer.plan), offer.created_at + offer.hours_to_complete * 3600,
                           OFFER, offer.expires_at))
