"""Durable job store: SQLite in WAL mode, one transaction per state change.

Jobs are the source of truth for the miner's promises: every accepted training request is a
row before the HTTP answer goes out, and the submission (repo, hash) is read from here.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

from cluster.plan import Plan

# Life of a job. `published` and `failed` are terminal.
QUEUED, SUBMITTED, RUNNING, PUBLISHING, PUBLISHED, FAILED = (
    "queued", "submitted", "running", "publishing", "published", "failed")
ACTIVE = (QUEUED, SUBMITTED, RUNNING, PUBLISHING)
TERMINAL = (PUBLISHED, FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    task_id TEXT PRIMARY KEY,
    task_type TEXT NOT NULL,
    model TEXT NOT NULL,
    dataset_url TEXT NOT NULL,
    dataset_type TEXT NOT NULL,
    file_format TEXT NOT NULL,
    expected_repo_name TEXT NOT NULL,
    hours_to_complete REAL NOT NULL,
    created_at REAL NOT NULL,
    deadline REAL NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    ray_submission_id TEXT,
    repo TEXT,
    model_hash TEXT,
    hparams TEXT,
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    faults TEXT
);
CREATE TABLE IF NOT EXISTS offers (
    task_id TEXT PRIMARY KEY,
    task_type TEXT NOT NULL,
    model TEXT NOT NULL,
    hours_to_complete REAL NOT NULL,
    accepted INTEGER NOT NULL,
    message TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""
# Columns added after the first release: ALTER TABLE on open keeps older databases working.
_ADDED_COLUMNS = {
    "jobs": {"plan": "TEXT", "started_at": "REAL",                  # capacity plan, placement
             "attempts": "INTEGER NOT NULL DEFAULT 0", "faults": "TEXT"},  # driver starts, survived faults
    "offers": {"plan": "TEXT", "expires_at": "REAL"},               # reservation of an accepted offer
}


@dataclass
class Job:
    task_id: str
    task_type: str
    model: str
    dataset_url: str
    dataset_type: dict
    file_format: str
    expected_repo_name: str
    hours_to_complete: float
    created_at: float
    deadline: float
    status: str = QUEUED
    reason: str | None = None
    ray_submission_id: str | None = None
    repo: str | None = None
    model_hash: str | None = None
    hparams: dict | None = None
    updated_at: float = 0.0
    plan: Plan | None = None          # the capacity plan; where and when once dispatched
    started_at: float | None = None
    attempts: int = 0                  # how many times a job driver has started on it
    faults: list | None = None         # what went wrong and was survived (worker crash, watchdog, ...)

    @property
    def submission_id(self) -> str:
        return f"miner-{self.task_id}"


@dataclass
class Offer:
    task_id: str
    task_type: str
    model: str
    hours_to_complete: float
    accepted: bool
    message: str
    created_at: float
    plan: Plan | None = None          # what an accepted offer reserved, until `expires_at`
    expires_at: float | None = None


_JSON_COLUMNS = ("dataset_type", "hparams", "plan", "faults")


def _to_json(value) -> str | None:
    """A JSON column's text: plans as their dict (old rows stored the same dict)."""
    if value is None:
        return None
    return json.dumps(value.to_dict() if isinstance(value, Plan) else value)


class JobStore:
    """A thread-safe SQLite store; every public method is one transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30,
                                     isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            self.add_columns(table, columns)

    def add_columns(self, table: str, columns: dict[str, str]) -> None:
        """Migration: adds the columns a table lacks (existing rows get NULL)."""
        have = {r["name"] for r in self._conn.execute(f"PRAGMA table_info({table})")}
        with self._tx() as c:
            for name, decl in columns.items():
                if name not in have:
                    try:
                        c.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
                    except sqlite3.OperationalError as exc:  # another process added it first
                        if "duplicate column" not in str(exc):
                            raise

    def transaction(self):
        """One write transaction, for modules that keep their own tables in this database."""
        return self._tx()

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, args).fetchall()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

    # jobs -----------------------------------------------------------------
    def add_job(self, job: Job) -> bool:
        """Inserts the job; False (and no change) if this task_id is already known."""
        job.updated_at = time.time()
        row = {f.name: getattr(job, f.name) for f in fields(Job)}
        for col in _JSON_COLUMNS:
            row[col] = _to_json(row[col])
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._tx() as c:
            cur = c.execute(f"INSERT OR IGNORE INTO jobs ({cols}) VALUES ({marks})", tuple(row.values()))
            return cur.rowcount == 1

    def get_job(self, task_id: str) -> Job | None:
        row = self._conn.execute("SELECT * FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
        return _job_from_row(row) if row else None

    def list_jobs(self, statuses: tuple[str, ...] | None = None) -> list[Job]:
        if statuses:
            marks = ",".join("?" for _ in statuses)
            rows = self._conn.execute(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY deadline", statuses).fetchall()
        else:
            rows = self._conn.execute("SELECT * FROM jobs ORDER BY created_at").fetchall()
        return [_job_from_row(r) for r in rows]

    def update_job(self, task_id: str, *, only_if_status: tuple[str, ...] | None = None, **changes) -> bool:
        """Applies `changes`; with `only_if_status`, only when the job is in one of those states."""
        for col in _JSON_COLUMNS:
            if col in changes:
                changes[col] = _to_json(changes[col])
        changes["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in changes)
        args = list(changes.values()) + [task_id]
        where = "task_id = ?"
        if only_if_status:
            where += f" AND status IN ({','.join('?' for _ in only_if_status)})"
            args += list(only_if_status)
        with self._tx() as c:
            return c.execute(f"UPDATE jobs SET {sets} WHERE {where}", args).rowcount == 1

    def start_attempt(self, task_id: str) -> int:
        """Counts one more driver start on the job; returns the new count."""
        with self._tx() as c:
            c.execute("UPDATE jobs SET attempts = attempts + 1, updated_at = ? WHERE task_id = ?",
                      (time.time(), task_id))
            row = c.execute("SELECT attempts FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
            return int(row["attempts"]) if row else 0

    def add_fault(self, task_id: str, fault: dict) -> None:
        """Appends one survived fault to the job's record, in one transaction."""
        with self._tx() as c:
            row = c.execute("SELECT faults FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                return
            faults = json.loads(row["faults"]) if row["faults"] else []
            faults.append({"at": round(time.time(), 3), **fault})
            c.execute("UPDATE jobs SET faults = ?, updated_at = ? WHERE task_id = ?",
                      (json.dumps(faults), time.time(), task_id))

    # offers ---------------------------------------------------------------
    def record_offer(self, offer: Offer) -> None:
        self.record_offers([offer])

    def record_offers(self, offers: list[Offer]) -> None:
        """One transaction (one fsync) for a batch of offers."""
        with self._tx() as c:
            c.executemany("INSERT OR REPLACE INTO offers (task_id, task_type, model, hours_to_complete, accepted, "
                          "message, created_at, plan, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          [(o.task_id, o.task_type, o.model, o.hours_to_complete, int(o.accepted), o.message,
                            o.created_at, _to_json(o.plan), o.expires_at) for o in offers])

    def get_offer(self, task_id: str) -> Offer | None:
        row = self._conn.execute("SELECT * FROM offers WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        return _offer_from_row(row)

    def reserved_offers(self, now: float) -> list[Offer]:
        """Accepted offers still holding a reservation: not expired, no training request yet."""
        rows = self._conn.execute(
            "SELECT * FROM offers WHERE accepted = 1 AND expires_at > ? AND plan IS NOT NULL "
            "AND task_id NOT IN (SELECT task_id FROM jobs)", (now,)).fetchall()
        return [_offer_from_row(r) for r in rows]


def _offer_from_row(row: sqlite3.Row) -> Offer:
    data = dict(row)
    data["plan"] = Plan.from_dict(json.loads(data["plan"])) if data.get("plan") else None
    return Offer(**{**data, "accepted": bool(row["accepted"])})


def _job_from_row(row: sqlite3.Row) -> Job:
    data = dict(row)
    for col in _JSON_COLUMNS:
        data[col] = json.loads(data[col]) if data[col] else None
    data["plan"] = Plan.from_dict(data["plan"])
    return Job(**data)
