"""The tournament trainer: G.O.D's standalone-trainer contract on top of the miner's own pipeline.

Validators build our image and run its entrypoint with
    --task-id --model --dataset --dataset-type '<json>' --task-type --file-format
    --expected-repo-name --hours-to-complete <hours>
then upload `/app/checkpoints/<task_id>/<expected_repo_name>` when the process exits or when the
time limit kills it (gradients-protocol.md §10.2, §13). So: inputs come from the validator's
read-only /cache (no network at run time); bad inputs fail at once with one readable line and
nothing in the output folder; the run plans for every GPU it can see (tournament_plan.py) inside
a local Ray instance sized to the container; and from the first checkpoint on, the output folder
holds exactly one complete model at its top level (the best so far, swapped in atomically), so a
kill at any moment leaves something to upload.
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
from dataclasses import replace
from pathlib import Path

from cluster.jobs.container import cache_model_name
from cluster.jobs.fetch import InputError, download_dataset, parse_rows
from cluster.jobs.hub import point_adapter_at_base
from cluster.jobs.job_main import plan
from cluster.jobs.publish import best_checkpoint
from cluster.jobs.tournament_plan import (
    TOURNAMENT_TRAIN_OPTIONS,
    Hardware,
    RunPlan,
    detect_hardware,
    plan_run,
    ray_init_kwargs,
)
from cluster.planning.dataset_checks import check_rows
from cluster.protocol.wire import TaskType, parse_dataset_type, task_type_of
from cluster.settings import Settings, TournamentEnv, load_settings, load_tournament_env
from cluster.state.store import Job
from trainers.paths import JobPaths

KL_WEIGHTED = ("InstructTextTask", "ChatTask")  # the validator's instruct_text evaluator adds the KL term

TASK_TYPES = [t.value for t in TaskType if t != TaskType.IMAGETASK]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one readable line, exit 2 (argparse prints the whole usage)
        raise InputError(f"bad arguments: {message}")


def parse_args(argv: list[str] | None = None, env: TournamentEnv | None = None) -> argparse.Namespace:
    env = env or TournamentEnv()
    p = _Parser(description="Gradients tournament trainer (G.O.D standalone-trainer contract)")
    p.add_argument("--task-id", required=True)
    p.add_argument("--model", required=True, help="HF id, folder name under /cache/models, or a local directory")
    p.add_argument("--dataset", required=True, help="the task's dataset URL (read from /cache) or a local JSON file")
    p.add_argument("--dataset-type", required=True, help="JSON of the task's dataset_type")
    p.add_argument("--task-type", required=True)
    p.add_argument("--file-format", default="s3")
    p.add_argument("--expected-repo-name", required=True)
    p.add_argument("--hours-to-complete", type=float, required=True,
                   help="the time limit in hours (the validator kills the container at hours x 3600 s)")
    p.add_argument("--output-root", default=str(env.output_root))
    p.add_argument("--cache-root", default=str(env.cache_root))
    args = p.parse_args(argv)
    if args.task_type not in TASK_TYPES:
        raise InputError(f"unknown --task-type {args.task_type!r} (this trainer runs {', '.join(TASK_TYPES)})")
    if not args.hours_to_complete > 0:
        raise InputError(f"--hours-to-complete must be > 0, not {args.hours_to_complete}")
    for name in ("task_id", "expected_repo_name"):
        value = getattr(args, name)
        if not value or "/" in value or value in (".", ".."):
            raise InputError(f"--{name.replace('_', '-')} {value!r} cannot name a folder")
    return args


def check_dataset_type(args: argparse.Namespace):
    try:
        raw = json.loads(args.dataset_type)
    except json.JSONDecodeError as exc:
        raise InputError(f"--dataset-type is not JSON: {exc}") from None
    dataset_type = parse_dataset_type(raw)
    if task_type_of(dataset_type).value != args.task_type:
        raise InputError(f"--dataset-type describes a {task_type_of(dataset_type).value}, "
                         f"but --task-type is {args.task_type}")
    return dataset_type


def locate_model(model: str, cache_root: Path, settings: Settings) -> Path:
    """A local directory, else the downloader's copy in /cache/models (by the name as given, as
    `org--name`, or salted), else the Hub when it is reachable (never inside the validator)."""
    local = Path(model).expanduser()
    candidates = [local, cache_root / "models" / model, cache_root / "models" / cache_model_name(model)]
    for path in candidates:
        if path.is_dir() and (path / "config.json").exists():
            return path.resolve()
    if settings.hf_offline:
        looked = ", ".join(str(p) for p in candidates[1:])
        raise InputError(f"model {model!r} is not in the cache (looked in {looked}) and the Hub is offline")
    from cluster.jobs.fetch import resolve_model

    return resolve_model(model, settings.model_cache_dir, settings.hf_token)


def locate_dataset(dataset: str, task_id: str, cache_root: Path, dest: Path, max_bytes: int) -> list:
    """The downloader's copy in /cache/datasets, else a local file, else a download of the URL."""
    cached = cache_root / "datasets" / f"{task_id}_train_data.json"
    if cached.is_file():
        source = cached
    elif "://" not in dataset:
        source = Path(dataset).expanduser()
        if not source.is_file():
            raise InputError(f"dataset {dataset!r} is neither in the cache ({cached}) nor a file")
    else:
        return download_dataset(dataset, dest, max_bytes)
    shutil.copyfile(source, dest)
    return parse_rows(dest)


class LiveExport:
    """Keeps the output folder holding the best complete checkpoint so far: polls the run's
    checkpoints and swaps a better one in (trainers.launch.export_checkpoint: one rename), with
    the adapter pointing at the base model id. The final model goes in through `finish`."""

    def __init__(self, runs_dir: Path, out_dir: Path, base_model_id: str, poll_s: float = 5.0):
        self.runs_dir, self.out_dir, self.base_model_id, self.poll_s = runs_dir, out_dir, base_model_id, poll_s
        self.current: Path | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="live-export", daemon=True)

    def start(self) -> "LiveExport":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # a checkpoint removed while copying: try again next poll
                traceback.print_exc()

    def poll(self) -> None:
        checkpoint = best_checkpoint(self.runs_dir)
        if checkpoint is None or checkpoint == self.current:
            return
        self._put(checkpoint)
        print(f"[tournament] exported {checkpoint.name} to {self.out_dir}", flush=True)

    def finish(self, model_dir: Path | None) -> None:
        """Stops polling and puts `model_dir` (the run's selection) in place; None: the best checkpoint."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if model_dir is not None:
            self._put(model_dir)
        else:
            self.poll()

    def _put(self, source: Path) -> None:
        from trainers.launch import export_checkpoint

        with self._lock:
            export_checkpoint(source, self.out_dir, fix=lambda d: point_adapter_at_base(d, self.base_model_id))
            self.current = source


def process_start() -> float:
    """When this process started (the validator's clock starts with the container, a little
    earlier; imports alone take seconds): the limit counts from here, not from when we look."""
    try:
        return os.stat(f"/proc/{os.getpid()}").st_ctime
    except OSError:
        return time.time()


def prepare(args: argparse.Namespace, settings: Settings, env: TournamentEnv, hw: Hardware,
            work: Path, start: float) -> tuple[Job, object, RunPlan]:
    """Inputs checked and the training configuration planned; raises InputError on bad input."""
    from transformers import AutoConfig

    from tuning.priors import param_count_from_config

    dataset_type = check_dataset_type(args)
    model_dir = locate_model(args.model, Path(args.cache_root), settings)
    work.mkdir(parents=True, exist_ok=True)
    rows = locate_dataset(args.dataset, args.task_id, Path(args.cache_root), work / "train_data.json",
                          settings.max_dataset_bytes)
    report = check_rows(rows, dataset_type.model_dump())
    if len(report.rows) != len(rows):
        (work / "train_data.json").write_text(json.dumps(report.rows))
    params = param_count_from_config(AutoConfig.from_pretrained(model_dir))
    run_plan = plan_run(params, args.task_type, hw, kl=bool(env.kl_weight) and args.task_type in KL_WEIGHTED)
    job = Job(task_id=args.task_id, task_type=args.task_type, model=args.model, dataset_url=args.dataset,
              dataset_type=dataset_type.model_dump(), file_format=args.file_format,
              expected_repo_name=args.expected_repo_name, hours_to_complete=args.hours_to_complete,
              created_at=start, deadline=start + args.hours_to_complete * 3600, plan=run_plan.job_plan())
    # the tournament's own options as train options below the operator's MINER_TRAIN_OPTIONS, which keep the last word
    options = replace(settings, train_options={**TOURNAMENT_TRAIN_OPTIONS, **settings.train_options})
    cfg = plan(job, options, model_dir, work / "train_data.json", report.rows, JobPaths(work).runs)
    cfg.use_gpu, cfg.num_workers = run_plan.use_gpu, run_plan.workers  # what this container has, not the settings'
    cfg.early_save = True  # a model in the output folder minutes after the start, not at the first planned save
    cfg.progress_file = str(work / "progress.json")  # live step, loss, tokens/s (rank 0), for whoever watches
    if args.task_type in KL_WEIGHTED:  # scored as eval_loss + KL_COEF x KL(model || base): train for that
        cfg.kl_coef = env.kl_weight
    cfg.extra = {**cfg.extra, "baseline_stats": env.baseline_stats, "miner_datasets": [str(p) for p in env.miner_datasets]}
    return job, cfg, run_plan


def run(args: argparse.Namespace, settings: Settings, env: TournamentEnv) -> int:
    start = process_start()
    deadline = start + args.hours_to_complete * 3600
    out_dir = Path(args.output_root) / args.task_id / args.expected_repo_name
    work = Path(args.output_root) / args.task_id / ".work"  # beside, never inside, the uploaded folder
    hw = detect_hardware()
    try:
        job, cfg, run_plan = prepare(args, settings, env, hw, work, start)
    except ValueError as exc:  # InputError, DatasetError, pydantic's ValidationError: bad input
        print(f"[tournament] FAILED: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    for line in run_plan.why:
        print(f"[tournament] plan: {line}", flush=True)
    print(f"[tournament] plan: {run_plan.method}, {run_plan.workers} worker(s), "
          f"{'GPU' if run_plan.use_gpu else 'CPU'}; training stops {deadline - cfg.train_deadline:.0f} s "
          f"before the {args.hours_to_complete * 3600:.0f} s limit", flush=True)
    JobPaths(work).hparams.write_text(json.dumps({**cfg.to_dict(), "run_plan": run_plan.__dict__}, indent=2))
    import ray

    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(hw, temp_dir=str(Path(settings.tmp_dir) / "ray")))
    from trainers.seed_soup import fit_with_soup

    export = LiveExport(JobPaths(work).runs, out_dir, args.model, env.export_poll_s).start()
    try:
        outcome = fit_with_soup(cfg, work / "model")
        export.finish(outcome.model_dir)
        (work / "summary.json").write_text(json.dumps(outcome.summary, indent=2, default=str))
        for bulky in ("runs", "model"):  # checkpoints (and a seed soup's runs) on the validator's volume: only the logs stay
            shutil.rmtree(work / bulky, ignore_errors=True)
    except Exception as exc:
        traceback.print_exc()
        export.finish(None)  # deadlines are sacred: the best checkpoint saved before the failure
        if export.current is None:
            print(f"[tournament] FAILED: training failed before any checkpoint: {_one_line(exc)}",
                  file=sys.stderr, flush=True)
            return 1
        print(f"[tournament] training failed ({type(exc).__name__}); kept {export.current.name}", flush=True)
    print(f"[tournament] model in {out_dir}; {deadline - time.time():.0f} s before the limit", flush=True)
    return 0


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        env = load_tournament_env()
        args = parse_args(argv, env)
    except (InputError, ValueError) as exc:
        print(f"[tournament] FAILED: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    return run(args, load_settings(), env)
