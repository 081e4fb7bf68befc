"""The control plane killed between (and during) SQLite writes: a subprocess drives jobs
through their life as fast as it can and dies by os._exit at a random moment; the store it
leaves must be consistent, and hold at least everything the process saw committed."""
import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

from cluster.state.store import ACTIVE, PUBLISHED, TERMINAL, JobStore

REPO = Path(__file__).resolve().parents[2]
LIFE = ["queued", "submitted", "running", "publishing", "published"]

DRIVER = """
import os, random, sys, threading, time
from cluster.state.store import Job, JobStore, Offer
db, seed, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
random.seed(seed)
store = JobStore(db)
threading.Timer(delay, lambda: os._exit(9)).start()   # the crash, at a random moment
life = ["submitted", "running", "publishing"]
n = 0
while True:
    tid = f"{seed}-{n}"
    now = time.time()
    store.record_offer(Offer(tid, "InstructTextTask", "m", 1.0, True, "accepted", now))
    store.add_job(Job(tid, "InstructTextTask", "m", "http://d", {"field_instruction": "i"}, "s3", "r", 1.0, now, now + 3600))
    print("committed", tid, "queued", flush=True)
    for status in life:
        store.update_job(tid, only_if_status=("queued", "submitted", "running"), status=status)
        print("committed", tid, status, flush=True)
    store.add_fault(tid, {"kind": "test", "n": n})
    store.update_job(tid, only_if_status=("publishing",), status="published", repo=f"u/{tid}", model_hash="ab" * 32)
    print("committed", tid, "published", flush=True)
    n += 1
"""


def test_store_is_consistent_after_being_killed_at_random_points(tmp_path):
    rng = random.Random(8)
    for trial in range(10):
        db = tmp_path / f"m{trial}.db"
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(db), str(trial), str(rng.uniform(0.1, 0.4))],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 9, proc.stderr[-2000:]
        seen: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            if len(line.split()) == 3:  # the crash may cut the last line short
                _, tid, status = line.split()
                seen[tid] = status
        assert seen, "the driver committed nothing before the crash"
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        store = JobStore(db)  # reopening recovers the WAL
        jobs = {j.task_id: j for j in store.list_jobs()}
        for tid, status in seen.items():  # nothing the process saw committed is lost
            assert tid in jobs, f"trial {trial}: committed job {tid} lost"
            got = LIFE.index(jobs[tid].status)
            assert LIFE.index(status) <= got <= LIFE.index(status) + 1  # at most the one unprinted write
        for job in jobs.values():  # every row is whole: no half-applied state change
            assert job.status in ACTIVE + TERMINAL
            assert (job.status == PUBLISHED) == bool(job.repo and job.model_hash)
            assert store.get_offer(job.task_id).accepted
            assert json.dumps(job.faults or [])
        assert len(jobs) <= len(seen) + 1
