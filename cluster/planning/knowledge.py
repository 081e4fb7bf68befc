"""The knowledge base: what every finished job taught us, keyed by model family.

A family is `config.json`'s `model_type` (else its first architecture), never the repo name.
Admission reads it in memory: a family that failed twice here since its last success is
declined; measured tokens/s over the planner's prediction scales later time estimates; measured
publish speed (bytes / seconds of upload + verification) sizes the reserve kept for publishing;
the learning rates of published jobs refine the next similar job's LR prior (`winning_lrs`).
"""
from __future__ import annotations

import json
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

FAILURES_TO_BLOCK = 2
SPEEDUP_BOUNDS = (0.25, 2.0)   # one odd run must not make the planner reckless or useless
SPEEDUP_WINDOW = 10            # latest successes used per family
PUBLISH_SAMPLES = 5            # measured publishes before they replace the planner's upload speed
PUBLISH_WINDOW = 50            # latest publishes used (all families: it is this site's network)
MIN_PUBLISH_SIGMA = 0.3        # a few steady uploads must not shrink the reserve to nothing
MIN_PUBLISH_BYTES = 256 * 1024**2  # smaller publishes measure the hub's latency, not the bandwidth
LR_WINDOW = 20                 # latest winning LRs used per (family, task type, method, size class)
SIZE_CLASS_RATIO = 2.0         # "same size": within this factor of the job's parameter count

_SCHEMA = """
CREATE TABLE IF NOT EXISTS knowledge (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT,
    family TEXT NOT NULL,
    model TEXT,
    params INTEGER,
    task_type TEXT,
    method TEXT,
    gpus INTEGER,
    gpu_type TEXT,
    lr REAL,
    lora_r INTEGER,
    tokens_per_s REAL,
    predicted_tokens_per_s REAL,
    peak_mem_gib REAL,
    upload_bytes INTEGER,
    upload_s REAL,
    outcome TEXT NOT NULL,
    reason TEXT,
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS knowledge_family ON knowledge (family);
"""
SUCCESS, FAILURE = "published", "failed"


@dataclass
class Run:
    family: str
    outcome: str                          # published | failed
    task_id: str | None = None
    model: str | None = None
    params: int | None = None
    task_type: str | None = None
    method: str | None = None
    gpus: int | None = None
    gpu_type: str | None = None
    lr: float | None = None
    lora_r: int | None = None
    tokens_per_s: float | None = None
    predicted_tokens_per_s: float | None = None
    peak_mem_gib: float | None = None
    upload_bytes: int | None = None       # what was published, and how long upload + verification took
    upload_s: float | None = None
    reason: str | None = None
    recorded_at: float = field(default_factory=time.time)

    @staticmethod
    def of(family: str, outcome: str, job, **measured) -> "Run":
        """A run of `job` (a store.Job), keyed by its plan's shape; `measured`: the other fields."""
        p = job.plan
        shape = dict(params=p.params or None, method=p.method or None, gpus=p.gpus, gpu_type=p.gpu_type) if p else {}
        return Run(family, outcome, job.task_id, job.model, task_type=job.task_type, **shape, **measured)


@dataclass
class FamilyStats:
    failures_since_success: int = 0
    last_failure: str | None = None
    ratios: list[float] = field(default_factory=list)

    def add(self, run: Run) -> None:
        if run.outcome == SUCCESS:
            self.failures_since_success = 0
            if run.tokens_per_s and run.predicted_tokens_per_s:
                self.ratios = (self.ratios + [run.tokens_per_s / run.predicted_tokens_per_s])[-SPEEDUP_WINDOW:]
        else:
            self.failures_since_success += 1
            self.last_failure = run.reason


class Knowledge:
    """The table in the job store's database plus an in-memory summary (read per offer)."""

    def __init__(self, store=None):
        self.store = store
        self._lock = threading.Lock()
        self._stats: dict[str, FamilyStats] = {}
        self._publish_bps: list[float] = []
        self._wins: list[Run] = []   # published runs with a recorded LR, oldest first
        if store is not None:
            with store.transaction() as c:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    c.execute(statement)
            store.add_columns("knowledge", {"upload_bytes": "INTEGER", "upload_s": "REAL"})  # older databases
            self.reload()

    def reload(self) -> None:
        if self.store is None:
            return
        stats: dict[str, FamilyStats] = {}
        bps: list[float] = []
        wins: list[Run] = []
        for row in self.store.query("SELECT * FROM knowledge ORDER BY recorded_at, id"):
            run = Run(**{f.name: row[f.name] for f in fields(Run)})
            stats.setdefault(run.family, FamilyStats()).add(run)
            bps = _add_publish(bps, run)
            wins = _add_win(wins, run)
        with self._lock:
            self._stats, self._publish_bps, self._wins = stats, bps, wins

    def record(self, run: Run) -> None:
        if self.store is not None:
            row = asdict(run)
            with self.store.transaction() as c:
                c.execute(f"INSERT INTO knowledge ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                          tuple(row.values()))
        with self._lock:
            self._stats.setdefault(run.family, FamilyStats()).add(run)
            self._publish_bps = _add_publish(self._publish_bps, run)
            self._wins = _add_win(self._wins, run)

    def advice(self, family: str | None) -> "Advice":
        """What admission needs from the record of this family, read once per request."""
        return Advice(self.blocked(family), self.speedup(family), self._publish_bps)

    def blocked(self, family: str | None) -> str | None:
        """Why this family is declined here, or None."""
        s = self._stats.get(family) if family else None
        if s and s.failures_since_success >= FAILURES_TO_BLOCK:
            return (f"model family {family!r} failed {s.failures_since_success} times here since its last "
                    f"success (last: {(s.last_failure or 'unknown')[:120]})")
        return None

    def speedup(self, family: str | None) -> float:
        """Measured / predicted throughput: this family's median, else all families', else 1."""
        s = self._stats.get(family) if family else None
        ratios = s.ratios if s and s.ratios else [r for st in self._stats.values() for r in st.ratios]
        if not ratios:
            return 1.0
        lo, hi = SPEEDUP_BOUNDS
        return min(hi, max(lo, statistics.median(ratios)))

    def publish_timing(self, base):
        return Advice(None, 1.0, self._publish_bps).timing(base)


    def winning_lrs(self, family: str | None, n_params: int | None, task_type: str, method: str) -> list[float]:
        """LRs of the latest published jobs of this family, task type and method whose size is
        within SIZE_CLASS_RATIO of `n_params` (tuning.priors.refine_lr_prior pulls the prior
        towards them). A published job is the only "win" this miner observes itself."""
        if not family or not n_params or n_params <= 0:
            return []
        same = [r.lr for r in self._wins if r.family == family and r.task_type == task_type and r.method == method
                and r.params and abs(math.log(r.params / n_params)) <= math.log(SIZE_CLASS_RATIO)]
        return same[-LR_WINDOW:]


@dataclass(frozen=True)
class Advice:
    """The knowledge base's word on one family, for one admission decision."""
    blocked: str | None          # why this family is declined here, or None
    speedup: float               # measured / predicted throughput
    publish_bps: list[float]     # measured publish speeds (all families: this site's network)

    def timing(self, base):
        """The planner's Timing with upload speed and spread as measured here (median bytes/s and
        the spread of log speed over the latest publishes), once there are enough of them."""
        bps = self.publish_bps
        if len(bps) < PUBLISH_SAMPLES:
            return base
        logs = [math.log(b) for b in bps]
        return replace(base, upload_bps=statistics.median(bps),
                       publish_sigma=max(MIN_PUBLISH_SIGMA, statistics.stdev(logs)))


def _add_win(wins: list[Run], run: Run) -> list[Run]:
    if run.outcome == SUCCESS and run.lr and run.lr > 0 and math.isfinite(run.lr):
        return wins + [run]
    return wins


def _add_publish(bps: list[float], run: Run) -> list[float]:
    if run.upload_bytes and run.upload_bytes >= MIN_PUBLISH_BYTES and run.upload_s and run.upload_s > 0:
        return (bps + [run.upload_bytes / run.upload_s])[-PUBLISH_WINDOW:]
    return bps


def family_of(config: dict | None) -> str | None:
    """The model family from a config.json dict: `model_type`, else the first architecture."""
    if not config:
        return None
    if config.get("model_type"):
        return str(config["model_type"]).lower()
    arch = config.get("architectures") or []
    return str(arch[0]).lower() if arch else None


def needs_remote_code(config: dict | None) -> bool:
    """Hook: a config with `auto_map`, or a model_type that is not a causal LM built into
    transformers, loads custom code, which the validator never trusts."""
    from trainers.families import unsupported_reason

    return bool(config) and unsupported_reason(config) is not None


def local_config(model: str, cache_dir: Path | None) -> dict | None:
    """config.json of a local model directory or of an already-downloaded HF snapshot; None
    otherwise (the offer path never touches the network)."""
    candidates = [Path(model).expanduser() / "config.json"]
    if cache_dir is not None and "/" in model:
        snaps = Path(cache_dir) / f"models--{model.replace('/', '--')}" / "snapshots"
        if snaps.is_dir():
            candidates += sorted(snaps.glob("*/config.json"))
    for path in candidates:
        try:
            if path.is_file():
                return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def learn(knowledge: Knowledge, job, model_dir: Path | None, cfg, summary: dict | None, failure: str | None,
          upload: tuple[int, float] | None = None) -> None:
    """Records a finished job (a job_main outcome): published when `failure` is None; `upload` is
    (bytes published, seconds the upload and its verification took)."""
    config = local_config(str(model_dir), None) if model_dir else None
    family = family_of(config)
    if family is None:
        return  # nothing to key it by: the failure happened before the model was on disk
    summary = summary or {}
    upload_bytes, upload_s = upload or (None, None)
    tps = summary["tokens"] / summary["train_seconds"] if summary.get("tokens") and summary.get("train_seconds") else None
    knowledge.record(Run.of(family, FAILURE if failure else SUCCESS, job, lr=getattr(cfg, "lr", None),
                            lora_r=getattr(cfg, "lora_r", None), tokens_per_s=tps,
                            predicted_tokens_per_s=(job.plan.tokens_per_s or None) if job.plan else None,
                            peak_mem_gib=summary.get("peak_mem_gib"), upload_bytes=upload_bytes, upload_s=upload_s,
                            reason=failure))
