"""Disk cache policy: a size cap over the model cache and the folders of finished jobs, least
recently used first. Never touches what a job that is still active uses.

Units of eviction: one downloaded model (an HF cache entry `models--org--name`), or the bulky
part of one finished job's folder (checkpoints, exported model, dataset; its small reports stay).
"Last used" is the unit's folder mtime, refreshed by `touch` whenever a job uses the model.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cluster.settings import Settings
from cluster.state.store import ACTIVE, JobStore

JOB_BULK = ("runs", "model", "model.partial", "train_data.json", "prefetch")


@dataclass
class Unit:
    path: Path
    parts: tuple[Path, ...]   # what eviction deletes
    size: int
    last_used: float


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def touch(path: Path) -> None:
    """Marks a cache unit as just used."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def hf_cache_entry(cache_dir: Path, model_id: str) -> Path:
    return Path(cache_dir) / ("models--" + model_id.replace("/", "--"))


def units(settings: Settings) -> list[Unit]:
    found = []
    if settings.model_cache_dir.is_dir():
        for d in settings.model_cache_dir.iterdir():
            if d.is_dir() and d.name.startswith("models--"):
                found.append(Unit(d, (d,), dir_bytes(d), d.stat().st_mtime))
    if settings.jobs_dir.is_dir():
        for d in settings.jobs_dir.iterdir():
            parts = tuple(d / name for name in JOB_BULK if (d / name).exists())
            if d.is_dir() and parts:
                found.append(Unit(d, parts, sum(dir_bytes(p) for p in parts), d.stat().st_mtime))
    return found


def protected(settings: Settings, store: JobStore) -> set[Path]:
    """The job folders and cached models of jobs that are not finished."""
    keep = set()
    for job in store.list_jobs(ACTIVE):
        keep.add(settings.job_dir(job.task_id))
        keep.add(hf_cache_entry(settings.model_cache_dir, job.model))
    return keep


def prune(all_units: list[Unit], max_bytes: int, keep: set[Path]) -> list[Path]:
    """Deletes least-recently-used units until the total is within `max_bytes`; returns what
    it removed. Protected units count toward the total but are never removed."""
    total = sum(u.size for u in all_units)
    removed = []
    for unit in sorted(all_units, key=lambda u: u.last_used):
        if total <= max_bytes:
            break
        if unit.path in keep:
            continue
        for part in unit.parts:
            shutil.rmtree(part, ignore_errors=True) if part.is_dir() else part.unlink(missing_ok=True)
        total -= unit.size
        removed.append(unit.path)
    return removed


def clean(settings: Settings, store: JobStore) -> list[Path]:
    return prune(units(settings), settings.cache_max_bytes, protected(settings, store))
