"""What `miner jobs [--watch]` and `miner job <task_id>` print: rich renderables built from the
store, the live progress file the trainer writes, and the report files next to each job."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cluster.jobs.reports import PROGRESS_FILE
from cluster.settings import Settings
from cluster.state.store import FAILED, PUBLISHED, Job
from trainers.paths import JobPaths
from trainers.progress import read_progress

STATUS_STYLE = {"queued": "yellow", "submitted": "yellow", "running": "cyan", "publishing": "cyan",
                PUBLISHED: "green", FAILED: "red"}
HPARAM_KEYS = ("method", "lr", "lora_r", "lora_alpha", "epochs", "batch_tokens", "max_batch", "grad_accum",
               "warmup_fraction", "min_lr_ratio", "max_seq_len", "num_workers", "use_gpu", "label_selector", "n_params",
               "search")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _clock(ts: float | None) -> str:
    return "-" if not ts else datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M:%S")


def _duration(seconds: float) -> str:
    s = abs(int(seconds))
    text = f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    return ("-" if seconds < 0 else "") + text


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def jobs_table(jobs: list[Job], settings: Settings, now: float | None = None) -> Table:
    """One row per job: state, a progress bar of optimizer steps, losses, throughput, deadline."""
    now = now or time.time()
    table = Table(title=f"miner jobs  ({len(jobs)})  {_clock(now)} UTC", title_justify="left", box=box.SIMPLE_HEAD)
    for col, kw in (("task", {}), ("type", {}), ("status", {}), ("progress", {"width": 24}), ("step", {"justify": "right"}),
                    ("loss", {"justify": "right"}), ("dev loss", {"justify": "right"}), ("tok/s", {"justify": "right"}),
                    ("deadline", {"justify": "right"}), ("repo / reason", {"overflow": "fold", "max_width": 48})):
        table.add_column(col, **kw)
    for job in jobs:
        p = read_progress(settings.job_dir(job.task_id) / PROGRESS_FILE) or {}
        total = p.get("total") or 0
        step = p.get("step", 0)
        done = job.status == PUBLISHED
        bar = ProgressBar(total=max(total, 1), completed=total if done and total else step, width=22,
                          complete_style="green" if done else "cyan", finished_style="green", style="grey42")
        left = job.deadline - now
        deadline = "-" if job.status in (PUBLISHED, FAILED) else (f"in {_duration(left)}" if left > 0 else "passed")
        tail = Text(job.reason or "", style="red") if job.status == FAILED else Text(job.repo or "")
        table.add_row(job.task_id[:8], job.task_type.replace("TextTask", "").replace("Task", ""),
                      Text(job.status, style=STATUS_STYLE.get(job.status, "")), bar,
                      f"{step}/{total}" if total else "-", _fmt(p.get("loss")), _fmt(p.get("dev_loss")),
                      _fmt(p.get("tokens_per_s"), ".0f"), deadline, tail)
    return table


def job_story(job: Job, settings: Settings, ray_info: dict | None = None) -> Group:
    """One job from offer to outcome: what, timeline, hyperparameters, losses, outcome."""
    d = settings.job_dir(job.task_id)
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    head.add_row("task", job.task_id)
    head.add_row("type / model", f"{job.task_type} on {job.model}")
    head.add_row("status", Text(job.status, style=STATUS_STYLE.get(job.status, "")))
    head.add_row("Ray Job", job.ray_submission_id or job.submission_id)
    if job.repo:
        head.add_row("published", f"{job.repo}  hash {job.model_hash or '-'}")
    if job.reason:
        head.add_row("failure reason" if job.status == FAILED else "note", Text(job.reason, style="red"))
    parts = [Panel(head, title=f"job {job.task_id[:8]}", title_align="left"),
             _timeline(job, d, ray_info), _hparams(job, d), _losses(d)]
    files = (_read_json(d / "report.json") or {}).get("files")
    if files:
        parts.append(Text(f"report files in {d}: " + ", ".join(files), style="dim"))
    return Group(*[p for p in parts if p is not None])


def _timeline(job: Job, d: Path, ray_info: dict | None) -> Table:
    t = Table(title="timeline (UTC)", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("when", "event", "took"):
        t.add_column(col)
    t.add_row(_clock(job.created_at), f"training request accepted ({job.hours_to_complete:.2f} h budget)", "")
    if ray_info and ray_info.get("start_time"):
        t.add_row(_clock(ray_info["start_time"] / 1000), f"Ray Job started ({ray_info.get('status', '?')})", "")
    for ph in _read_json(d / "timeline.json") or []:
        t.add_row(_clock(ph["start"]), ph["phase"].replace("_", " "), _duration(ph["end"] - ph["start"]))
    p = read_progress(d / PROGRESS_FILE)
    if p and not p.get("done") and job.status not in (PUBLISHED, FAILED):
        t.add_row(_clock(p["updated_at"]), f"training: step {p['step']}/{p['total']}", _duration(p["elapsed_s"]))
    if job.status in (PUBLISHED, FAILED):
        t.add_row(_clock(job.updated_at), Text(job.status, style=STATUS_STYLE[job.status]),
                  _duration(job.updated_at - job.created_at))
    slack = job.deadline - (job.updated_at if job.status in (PUBLISHED, FAILED) else time.time())
    t.add_row(_clock(job.deadline), "deadline", f"slack {_duration(slack)}")
    return t


def _hparams(job: Job, d: Path, per_row: int = 4) -> Table | None:
    hp = job.hparams or _read_json(JobPaths(d).hparams)
    if not hp:
        return None
    pairs = [(k, hp[k]) for k in HPARAM_KEYS if k in hp] + list((hp.get("extra") or {}).items())
    t = Table(title="chosen hyperparameters", title_justify="left", box=box.SIMPLE_HEAD, show_header=False)
    for _ in range(per_row):
        t.add_column(style="bold")
        t.add_column(justify="right")
    for i in range(0, len(pairs), per_row):
        row = [cell for k, v in pairs[i:i + per_row] for cell in (k, _value(v))]
        t.add_row(*row)
    return t


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1e6:
        return f"{v / 1e6:.1f}M"
    return str(v) if v not in ({}, None) else "-"


def _losses(d: Path) -> Table | None:
    curve = _read_json(d / "loss_curve.json") or []
    selected = (_read_json(d / "summary.json") or {}).get("selected_checkpoint") or {}
    if not curve:
        return None
    t = Table(title=f"losses ({len(curve)} steps; plot: loss_curve.png)", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("step", "train loss", "dev loss", "lr", "tok/s"):
        t.add_column(col, justify="right")
    shown = [curve[0]] + [h for h in curve[1:-1] if h.get("dev_loss") is not None] + ([curve[-1]] if len(curve) > 1 else [])
    for h in shown:
        mark = " *" if selected.get("step") == h["step"] else ""
        t.add_row(f"{h['step']}{mark}", _fmt(h["loss"]), _fmt(h.get("dev_loss")), _fmt(h.get("lr"), ".2e"),
                  _fmt(h.get("tokens_per_s"), ".0f"))
    if selected:
        t.caption = f"* selected checkpoint (dev loss {_fmt(selected.get('dev_loss'))})"
    return t
