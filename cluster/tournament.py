"""The tournament trainer: G.O.D's standalone-trainer contract on top of the miner's own pipeline.

Validators build our image and run its entrypoint with
    --task-id --model --dataset --dataset-type '<json>' --task-type --file-format
    --expected-repo-name --hours-to-complete <int hours>
then upload `<output root>/<task_id>/<expected_repo_name>` when the process exits or when the
time limit kills it (`../shared/docs/gradients-protocol.md` §10.2). So: inputs come from the
validator's /cache when present (no network at run time), the same plan/fit as a task-offer job
runs, and a valid model is in the output folder before the limit, whatever happens.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

from .capacity import PUBLISH_RESERVE_S
from .fetch import InputError, download_dataset, parse_rows, resolve_model
from .hub import point_adapter_at_base
from .job_main import _fallback_outcome, plan
from .publish import best_checkpoint
from .protocol import TaskType, parse_dataset_type, task_type_of
from .settings import load_settings
from .store import Job

DEFAULT_OUTPUT_ROOT = "/app/checkpoints"   # the volume the validator uploads from
DEFAULT_CACHE_ROOT = "/cache"              # filled by the validator's downloader container
_EXPORT_LOCK = threading.Lock()            # the deadline guard and the final export never interleave


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Gradients tournament trainer (G.O.D standalone-trainer contract)")
    p.add_argument("--task-id", required=True)
    p.add_argument("--model", required=True, help="local model directory or Hugging Face id")
    p.add_argument("--dataset", required=True, help="local JSON file or URL (the task's S3 URL)")
    p.add_argument("--dataset-type", required=True, help="JSON of the task's dataset_type")
    p.add_argument("--task-type", required=True, choices=[t.value for t in TaskType if t != TaskType.IMAGETASK])
    p.add_argument("--file-format", default="s3")
    p.add_argument("--expected-repo-name", required=True)
    p.add_argument("--hours-to-complete", type=float, required=True,
                   help="the time limit (validators pass whole hours; fractions are accepted for tests)")
    p.add_argument("--output-root", default=os.environ.get("TOURNAMENT_OUTPUT_ROOT", DEFAULT_OUTPUT_ROOT))
    p.add_argument("--cache-root", default=os.environ.get("TOURNAMENT_CACHE_ROOT", DEFAULT_CACHE_ROOT))
    return p.parse_args(argv)


def locate_model(model: str, cache_root: Path, settings) -> Path:
    """A local directory, else the downloader's copy in /cache/models, else the Hub (if reachable)."""
    cached = cache_root / "models" / model.replace("/", "--")
    if not Path(model).expanduser().is_dir() and (cached / "config.json").exists():
        return cached
    return resolve_model(model, settings.model_cache_dir, settings.hf_token)


def locate_dataset(dataset: str, task_id: str, cache_root: Path, dest: Path, max_bytes: int) -> list:
    """A local file, else the downloader's copy in /cache/datasets, else a download of the URL."""
    cached = cache_root / "datasets" / f"{task_id}_train_data.json"
    if "://" not in dataset:
        source = Path(dataset).expanduser()
        if not source.is_file():
            raise InputError(f"dataset {dataset!r} is neither a file nor a URL")
    elif cached.is_file():
        source = cached
    else:
        return download_dataset(dataset, dest, max_bytes)
    shutil.copyfile(source, dest)
    return parse_rows(dest)


def guard_deadline(deadline: float, runs_dir: Path, out_dir: Path, margin_s: float) -> threading.Timer:
    """If training is still going at (deadline - margin), put the latest checkpoint in the output
    folder: the validator uploads whatever is there when its time limit kills us."""
    def rescue() -> None:
        checkpoint = best_checkpoint(runs_dir)
        with _EXPORT_LOCK:
            if checkpoint is None or out_dir.exists():
                return
            from trainers.launch import export_checkpoint

            export_checkpoint(checkpoint, out_dir)
        print(f"[tournament] deadline guard: exported {checkpoint} to {out_dir}", flush=True)

    timer = threading.Timer(max(0.0, deadline - margin_s - time.time()), rescue)
    timer.daemon = True
    timer.start()
    return timer


def run(args: argparse.Namespace) -> int:
    start = time.time()
    deadline = start + args.hours_to_complete * 3600
    out_dir = Path(args.output_root) / args.task_id / args.expected_repo_name
    work = Path(args.output_root) / args.task_id / "_work"  # beside, never inside, the uploaded folder
    work.mkdir(parents=True, exist_ok=True)
    settings = load_settings()
    try:
        dataset_type = parse_dataset_type(json.loads(args.dataset_type))
        if task_type_of(dataset_type).value != args.task_type:
            raise InputError(f"--dataset-type describes a {task_type_of(dataset_type).value}, "
                             f"but --task-type is {args.task_type}")
        rows = locate_dataset(args.dataset, args.task_id, Path(args.cache_root), work / "train_data.json",
                              settings.max_dataset_bytes)
        model_dir = locate_model(args.model, Path(args.cache_root), settings)
        job = Job(task_id=args.task_id, task_type=args.task_type, model=args.model, dataset_url=args.dataset,
                  dataset_type=dataset_type.model_dump(), file_format=args.file_format,
                  expected_repo_name=args.expected_repo_name, hours_to_complete=args.hours_to_complete,
                  created_at=start, deadline=deadline)
        cfg = plan(job, settings, model_dir, work / "train_data.json", rows, work / "runs")
    except (InputError, ValueError) as exc:  # bad inputs: fail at once, with the reason
        print(f"[tournament] FAILED: {exc}", file=sys.stderr, flush=True)
        return 2
    (work / "hparams.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    from trainers.launch import export_checkpoint, fit

    guard = guard_deadline(deadline, work / "runs", out_dir, margin_s=PUBLISH_RESERVE_S / 2)
    try:
        outcome = fit(cfg, work / "model")
    except Exception as exc:
        traceback.print_exc()
        outcome = _fallback_outcome(work, exc)
        if outcome is None:
            print(f"[tournament] FAILED: training failed before any checkpoint: {exc}", file=sys.stderr, flush=True)
            return 1
    guard.cancel()
    with _EXPORT_LOCK:
        export_checkpoint(outcome.model_dir, out_dir)
        point_adapter_at_base(out_dir, args.model)
    (work / "summary.json").write_text(json.dumps(outcome.summary, indent=2, default=str))
    print(f"[tournament] model in {out_dir}; {deadline - time.time():.0f} s before the limit", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))
