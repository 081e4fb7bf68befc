"""The `miner` command: serve, simulate, jobs, status."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx

from cluster.settings import Settings, env, load_settings
from cluster.state.store import JobStore

DEMO_TASK = Path(__file__).parent / "demo_task"


def _settings_with_metagraph() -> Settings:
    """Settings, with MINER_METAGRAPH_FILE defaulting to <state>/metagraph.json."""
    if not env("MINER_METAGRAPH_FILE"):  # set for the Serve replica and jobs too (Settings.as_env)
        os.environ["MINER_METAGRAPH_FILE"] = str(load_settings().state_dir / "metagraph.json")
    return load_settings()


def cmd_serve(args) -> int:
    from cluster.console.embedded import deploy
    from cluster.protocol.metagraph import chain_sync_available, status_line

    try:
        settings = load_settings()
    except ValueError as err:  # a malformed setting (MINER_TRAINING_COMMIT, MINER_TRAIN_OPTIONS, ...)
        print(f"miner serve: {err}", file=sys.stderr)
        return 2
    if settings.metagraph_file is None and not chain_sync_available():
        print("no validator allow-list: set MINER_METAGRAPH_FILE, or install the bittensor SDK "
              "(pip install bittensor) to sync NETUID from SUBTENSOR_NETWORK", file=sys.stderr)
        return 2
    try:
        ends = deploy(host=args.host, port=args.port)
    except RuntimeError as err:
        print(f"miner serve: {err}", file=sys.stderr)
        return 2
    from cluster.protocol.identity import miner_hotkey

    print(f"miner API:   {ends.api_url}   (hotkey {miner_hotkey(settings)})")
    print(f"dashboard:   {ends.dashboard_url}")
    print(f"state dir:   {settings.state_dir}")
    print(f"metagraph:   {status_line(settings)}")
    problem = settings.training_repo_problem()
    print(f"tournament:  {'NOT ENROLLED: ' + problem if problem else settings.training_repo + ' @ ' + settings.training_commit}")
    print("Ctrl-C stops the API (jobs on a shared cluster keep running; state is in SQLite).")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    return 0


def _miner_running(url: str) -> bool:
    try:
        return httpx.get(url.rstrip("/") + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def cmd_simulate_tournament(args) -> int:
    """Our trainer as the validator runs it, on each task: time used vs limit, base vs submission metric."""
    from rich.console import Console
    from rich.table import Table

    from cluster.console.simulate import load_task
    from cluster.console.tournament_sim import ContainerRun, default_work_dir, simulate_tournament

    settings = _settings_with_metagraph()
    tasks = [load_task(Path(t), args.minutes) for t in (args.task or [str(DEMO_TASK)])]
    if args.model is None:
        from cluster.console.demo_model import demo_model

        model = Path(demo_model(settings.state_dir, DEMO_TASK))
    else:
        model = Path(args.model).expanduser()
        if not (model / "config.json").exists():
            print(f"--model {model}: the tournament simulation needs a local model directory "
                  f"(the validator's downloader puts one in /cache)", file=sys.stderr)
            return 2
    root = Path(args.work_dir) if args.work_dir else default_work_dir()
    outcomes = []
    for spec in tasks:
        run = ContainerRun(work=root / spec.name, hours=spec.hours, kill_after_s=args.kill_after, gpus=args.gpus,
                           kl_coef=args.kl_coef if args.kl_coef is not None else spec.kl_coef, sandbox=args.sandbox)
        outcomes.append(simulate_tournament(spec, model.resolve(), run))
    table = Table(title="miner simulate --tournament")
    for col in ("task", "type", "exit", "time used / limit", "uploaded", "base metric", "submission metric"):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for o in outcomes:
        table.add_row(o.task, o.task_type, "killed" if o.killed else str(o.exit_code),
                      f"{o.seconds:.0f} / {o.limit_s:.0f} s", str(o.uploaded), fmt(o.base_metric),
                      fmt(o.submission_metric))
    Console(width=130).print(table)
    for o in outcomes:
        if o.detail:
            print(f"{o.task}: {o.detail}")
    print(f"runs, logs and uploaded models: {root}")
    return 0 if all(o.succeeded for o in outcomes) else 1


def cmd_simulate(args) -> int:
    if args.tournament:
        return cmd_simulate_tournament(args)
    from rich.console import Console
    from rich.table import Table

    from cluster.console.simulate import ValidatorClient, load_task, run_simulation, validator_keypair
    from cluster.protocol.identity import miner_hotkey

    settings = _settings_with_metagraph()
    tasks = [load_task(Path(t), args.minutes) for t in (args.task or [str(DEMO_TASK)])]
    if not _miner_running(args.miner_url):
        from cluster.console.embedded import deploy

        port = int(args.miner_url.rsplit(":", 1)[1].split("/")[0])
        print(f"no miner at {args.miner_url}: starting an embedded one ...", flush=True)
        ends = deploy(host="127.0.0.1", port=port, reconcile_interval_s=5.0)
        print(f"embedded miner API {ends.api_url}, dashboard {ends.dashboard_url}", flush=True)
    model = args.model
    if model is None and any("model" not in json.loads((t.path / "task.json").read_text()) for t in tasks):
        from cluster.console.demo_model import demo_model

        model = str(demo_model(settings.state_dir, DEMO_TASK))
        print(f"base model: {model}")
    client = ValidatorClient(args.miner_url, validator_keypair(settings), miner_hotkey(settings))
    outcomes = run_simulation(tasks, model, client, settings)

    time.sleep(1.0)  # Ray's log stream (job supervisor, workers) drains before the result, not into it
    Console(width=130).rule("result")
    table = Table(title="miner simulate")
    # the validator's metric: a loss, or for GRPO a reward (higher is better)
    for col in ("task", "type", "accepted", "status", "base metric", "submission metric", "hash ok"):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for o in outcomes:
        table.add_row(o.task, o.task_type, str(o.accepted), o.status, fmt(o.base_loss),
                      fmt(o.submission_loss), "-" if o.hash_ok is None else str(o.hash_ok))
    Console(width=130).print(table)
    for o in outcomes:
        if o.accepted and not o.verified:
            print(f"{o.task}: {o.detail}")
    accepted = [o for o in outcomes if o.accepted]
    if not accepted:
        print("no task was accepted")
    ok = bool(accepted) and all(o.verified for o in accepted)
    return 0 if ok else 1


def _console(args):
    from rich.console import Console

    # --save: also keep what was printed, as SVG or PNG (for docs and bug reports)
    return Console(width=args.width, record=bool(getattr(args, "save", None)))


def _save(console, args) -> None:
    """Writes the recorded output to args.save: .svg, or .png through cairosvg (the docs extra)."""
    if not getattr(args, "save", None):
        return
    # Drawn with DejaVu Sans Mono (present on most Linux hosts), whose glyphs are 0.602 em wide.
    svg = console.export_svg(title="miner", font_aspect_ratio=0.602).replace("Fira Code", "DejaVu Sans Mono")
    if args.save.endswith(".png"):
        import cairosvg  # pip install cairosvg

        cairosvg.svg2png(bytestring=svg.encode(), write_to=args.save)
    else:
        Path(args.save).write_text(svg)


def cmd_jobs(args) -> int:
    """Every job with a progress bar from the trainer's progress file; --watch refreshes live."""
    from rich.live import Live

    from cluster.console.jobview import jobs_table
    from cluster.state.store import ACTIVE

    settings = load_settings()
    store = JobStore(settings.db_path)
    console = _console(args)
    if not args.watch:
        console.print(jobs_table(store.list_jobs(), settings))
        _save(console, args)
        return 0
    try:
        with Live(jobs_table(store.list_jobs(), settings), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(args.interval)
                jobs = store.list_jobs()
                live.update(jobs_table(jobs, settings))
                if args.until_done and not any(j.status in ACTIVE for j in jobs):
                    break
    except KeyboardInterrupt:
        pass
    _save(console, args)
    return 0


def cmd_job(args) -> int:
    """One job's story: timeline, hyperparameters, losses, outcome or failure reason."""
    from cluster.console.jobview import job_story

    settings = load_settings()
    job = JobStore(settings.db_path).get_job(args.task_id)
    if job is None:
        print(f"no job {args.task_id} in {settings.db_path}", file=sys.stderr)
        return 2
    console = _console(args)
    console.print(job_story(job, settings, _ray_job_info(job.ray_submission_id or job.submission_id)))
    _save(console, args)
    return 0


def _ray_job_info(submission_id: str) -> dict | None:
    """The Ray Job's record when a cluster answers (RAY_ADDRESS / local dashboard), else None."""
    try:
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient(env("RAY_API_SERVER_ADDRESS")).get_job_info(submission_id)
    except Exception:
        return None
    return {"status": str(getattr(info.status, "value", info.status)), "start_time": info.start_time,
            "end_time": info.end_time, "driver_node_id": info.driver_node_id}


def cmd_status(args) -> int:
    settings = load_settings()
    store = JobStore(settings.db_path)
    counts: dict[str, int] = {}
    for j in store.list_jobs():
        counts[j.status] = counts.get(j.status, 0) + 1
    from cluster.protocol.metagraph import status_line

    print(f"state dir: {settings.state_dir}")
    print(f"metagraph: {status_line(settings)}")
    print(f"publishing to: {'Hugging Face as ' + settings.hf_username if settings.publishes_to_hf else settings.hub_dir}")
    print("jobs: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    url = env("MINER_API_URL", "http://127.0.0.1:7999")
    print(f"API {url}: {'up' if _miner_running(url) else 'not reachable'}")
    return 0


def cmd_tournament_check(args) -> int:
    """What a validator checks before enrolling the repository, each with pass/fail; non-zero while one fails."""
    from cluster.console.registration import fix_legal_files, run_checks, validator_checkout

    repo = Path(args.repo).resolve()
    checkout, tmp = (None, None)
    try:
        commit = args.commit or load_settings().training_commit  # a malformed MINER_TRAINING_COMMIT: its reason
        if args.validator_repo:
            checkout, tmp = validator_checkout(args.validator_repo)
            if args.fix:
                written = fix_legal_files(repo, checkout)
                print(f"wrote {', '.join(written)} from {args.validator_repo}: commit and push them to the default branch")
        checks = run_checks(repo, commit, checkout)
    except ValueError as err:
        print(f"tournament-check: {err}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<14} {c.detail}")
    failed = [c.name for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="miner", description="Ray-distributed Gradients miner")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="start (or join) Ray, deploy the API, run the control plane")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=7999)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("simulate", help="play a validator against the miner on local tasks")
    p.add_argument("--task", action="append", help="task folder (train.json, test.json, task.json); repeatable")
    p.add_argument("--model", help="base model: local directory or HF id (overrides task.json)")
    p.add_argument("--minutes", type=float, help="hours_to_complete, in minutes, for short runs")
    p.add_argument("--miner-url", default="http://127.0.0.1:7999")
    p.add_argument("--tournament", action="store_true",
                   help="run the tournament trainer as a validator does (cache layout, time limit, uploader)")
    p.add_argument("--gpus", type=int, help="with --tournament: GPUs the container sees (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--kl-coef", type=float, help="with --tournament: a KL-weighted task (USE_KL=1, KL_COEF)")
    p.add_argument("--kill-after", type=float, help="with --tournament: kill at this many seconds instead of the limit")
    p.add_argument("--sandbox", action="store_true",
                   help="with --tournament: no network, no capabilities, read-only /cache (needs root)")
    p.add_argument("--work-dir", help="with --tournament: where the runs go (default: a new temp folder)")
    p.set_defaults(fn=cmd_simulate)
    p = sub.add_parser("jobs", help="jobs with live progress bars, losses and deadlines")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    p.add_argument("--until-done", action="store_true", help="with --watch: stop when no job is active")
    p.set_defaults(fn=cmd_jobs)
    p = sub.add_parser("job", help="one job's story: timeline, hyperparameters, losses, failure reason")
    p.add_argument("task_id")
    p.set_defaults(fn=cmd_job)
    for name in ("jobs", "job"):
        sub.choices[name].add_argument("--width", type=int, default=None, help="console width")
        sub.choices[name].add_argument("--save", metavar="PATH", help="also write the output to PATH (.svg or .png)")
    sub.add_parser("status", help="what the control plane knows").set_defaults(fn=cmd_status)
    p = sub.add_parser("tournament-check", help="run the validator's registration checks on a repository")
    p.add_argument("--repo", default=".", help="the training repository (default: here)")
    p.add_argument("--validator-repo", help="a G.O.D checkout or git URL: its LICENSE.md and NOTICE are the reference")
    p.add_argument("--commit", help="the commit to check (default: MINER_TRAINING_COMMIT, else HEAD)")
    p.add_argument("--fix", action="store_true", help="copy the validator's LICENSE.md and NOTICE into --repo")
    p.set_defaults(fn=cmd_tournament_check)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
