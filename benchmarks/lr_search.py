"""LR search benchmark: range test + ASHA against a reference grid of full short runs.

For each bench task, with one base model on CPU and the job's default method (LoRA, rank from
the priors):
1. grid: full short runs (the real recipe, trainers.launch.fit) at 8 log-spaced LRs -> the
   best-in-grid dev loss (the validator's metric on the job's dev split);
2. ours: tuning.search.tune_hyperparameters (range test + ASHA on real local Ray), then the
   same full run at the chosen LR/rank;
3. baselines: that full run at TRL's SFTConfig default LR (2e-5) and the reference miner's 2e-4.
Compute is counted exactly from the deterministic batches: 3 x padded tokens per trained token
(forward + backward), 1 x per forward-only token (dev evaluations, the range test's baseline
pass); Ray's start-up overhead shows in the wall-clock columns, not in compute.

    nice -n 10 python benchmarks/lr_search.py --tasks instruct_wordplay instruct_pattern_induction
"""
from __future__ import annotations

import argparse
import fcntl
import json
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BENCH = REPO.parent / "shared" / "bench"

from trainers.batching import make_batches, split_dev  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.evaluate import evaluate_path  # noqa: E402
from trainers.instruct_format import eval_sequence_length, tokenize_rows  # noqa: E402
from trainers.modeling import load_tokenizer  # noqa: E402
from tuning.asha import AshaConfig  # noqa: E402
from tuning.priors import default_hparams  # noqa: E402
from tuning.range_test import RangeTestConfig  # noqa: E402
from tuning.search import SearchPlan, tune_hyperparameters  # noqa: E402

TRL_DEFAULT_LR = 2e-5      # trl 1.16 SFTConfig.learning_rate (also used with peft; its LoRA example passes 2e-4)
REFERENCE_MINER_LR = 2e-4  # G.O.D base.yml (axolotl LoRA r8)


class Costs:
    """Exact compute of a run from the deterministic batch order (the trainer's epoch-0 batches)."""

    def __init__(self, cfg: TrainConfig):
        tok = load_tokenizer(cfg.model_path)
        rows = json.loads(Path(cfg.train_file).read_text())
        examples, _ = tokenize_rows(rows, cfg.dataset_type, tok, cfg.max_seq_len or eval_sequence_length(2048))
        train, dev = split_dev(examples, cfg.dev_fraction, cfg.max_dev_rows, cfg.seed)
        batches = make_batches(train, cfg.batch_tokens, cfg.max_batch, cfg.seed)
        self.batch_tokens = [len(b) * max(len(e) for e in b) for b in batches]
        self.per_epoch = len(batches)
        self.dev_tokens = sum(len(b) * max(len(e) for e in b) for b in make_batches(dev, cfg.batch_tokens, 16, 0))

    def train(self, steps: int, evals: int) -> float:
        return 3 * sum(self.batch_tokens[:steps]) + evals * self.dev_tokens

    def range_test(self, steps: int, cached: int) -> float:
        cache = self.batch_tokens[:cached]
        return 3 * sum(cache[i % cached] for i in range(steps)) + sum(cache)


def full_run(cfg: TrainConfig, lr: float, out: Path, test_file: Path | None = None, **changes) -> dict:
    from trainers.launch import fit

    run = replace(cfg, lr=lr, run_dir=str(out / "runs"), run_name=f"lr{lr:.3g}", **changes)
    t0 = time.time()
    outcome = fit(run, out / f"model-lr{lr:.3g}")
    row = {"lr": lr, "lora_r": run.lora_r, "dev_loss": outcome.summary["best"]["dev_loss"],
           "steps": outcome.summary["steps"], "seconds": round(time.time() - t0, 1)}
    if test_file is not None:
        row["test_loss"] = evaluate_path(outcome.model_dir, cfg.model_path, test_file, cfg.dataset_type)
    return row


def _cached(path: Path, compute):
    """Grid results are kept between invocations (--phase grid runs them without Ray)."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


@contextmanager
def ray_lock(take_lock: bool = True):
    """Ray only under the machine's shared lock (unless the caller already holds it: --no-lock)."""
    import ray

    with open("/tmp/miner-ray.lock", "a") as lock:
        if take_lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
        ray.init(num_cpus=2, include_dashboard=True, object_store_memory=300_000_000, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def bench_task(task: str, model: Path, args, work: Path) -> dict:
    meta = json.loads((BENCH / "tasks" / task / "task.json").read_text())
    hp = default_hparams(2_884_736 if "pico" in model.name else 10**8, meta["task_type"], "lora")
    train_file = work / task / f"train_first{args.rows}.json"   # short runs: the first rows of train.json
    train_file.parent.mkdir(parents=True, exist_ok=True)
    train_file.write_text(json.dumps(json.loads((BENCH / "tasks" / task / "train.json").read_text())[:args.rows]))
    cfg = TrainConfig(model_path=str(model), train_file=str(train_file),
                      dataset_type=meta["dataset_type"], task_type=meta["task_type"], num_workers=0,
                      batch_tokens=args.batch_tokens, max_batch=args.max_batch, saves=1,
                      **{k: v for k, v in hp.items() if k not in ("saves", "epochs")})
    costs = Costs(cfg)
    cfg = replace(cfg, epochs=(args.steps + 0.5) / costs.per_epoch)
    test_file = BENCH / "tasks" / task / "test.json"
    print(f"[{task}] {costs.per_epoch} batches/epoch, full run = {args.steps} steps, prior lr {hp['lr']:.2e}", flush=True)

    grid_lrs = [args.grid_lo * (args.grid_hi / args.grid_lo) ** (i / 7) for i in range(8)]
    grid = _cached(work / task / "grid.json", lambda: [full_run(cfg, lr, work / task / "grid") for lr in grid_lrs])
    grid_s = sum(r["seconds"] for r in grid)
    best = min(grid, key=lambda r: r["dev_loss"])
    grid_compute = sum(costs.train(r["steps"], 1) for r in grid)
    print(f"[{task}] grid best lr {best['lr']:.2e} dev {best['dev_loss']:.4f} ({grid_s:.0f} s)", flush=True)

    # Baselines at the prior's rank: TRL's default LR (the grid's first point, same run) and 2e-4.
    baselines = None if args.phase in ("grid", "search") else _cached(work / task / "baselines.json", lambda: {
        "trl_default": {**grid[0], "test_loss": evaluate_path(work / task / "grid" / f"model-lr{TRL_DEFAULT_LR:.3g}",
                                                             cfg.model_path, test_file, cfg.dataset_type)},
        "reference_miner": full_run(cfg, REFERENCE_MINER_LR, work / task / "baselines", test_file)})
    if args.phase in ("grid", "baselines"):
        return {}  # (--phase search skips the baselines: it runs under the Ray lock, they need no Ray)

    rt = RangeTestConfig(steps=args.rt_steps, cached_batches=args.rt_cached)
    # LR only, at the prior's rank: compared like with like against the LR grid (jobs search the rank too).
    plan = SearchPlan(share=0.2, range_test=rt, range_test_share=1.0, cpu_trials=args.concurrent,
                      asha=AshaConfig(trials=args.trials, rungs=4, grace=1, search_rank=False),
                      trial_fraction=0.25, min_trial_steps=args.steps // 4, max_trial_steps=args.steps // 4)
    search_cfg = replace(cfg, num_workers=1, cpus_per_worker=1.0)

    def search() -> dict:
        shutil.rmtree(work / task / "search", ignore_errors=True)
        with ray_lock(not args.no_lock):  # Ray on a shared machine: only under the lock, only for the search
            t0 = time.time()
            tuned, outcome = tune_hyperparameters(search_cfg, work / task / "search", window_s=1e6,
                                                  prior_lr=hp["lr"], plan=plan, hidden_size=128)
            return {"seconds": round(time.time() - t0, 1), "tuned": {"lr": tuned.lr, "lora_r": tuned.lora_r},
                    "outcome": outcome.to_dict()}

    found = _cached(work / task / "search.json", search)
    outcome, chosen, search_s = found["outcome"], found["tuned"], found["seconds"]
    trials = (outcome["asha"] or {}).get("trials", [])
    search_compute = (costs.range_test(len(outcome["range_test"]["lrs"]), rt.cached_batches)
                      + sum(costs.train(t["steps"], t["iterations"]) for t in trials))
    print(f"[{task}] search chose {chosen} ({outcome['source']}) in {search_s:.0f} s", flush=True)
    if args.phase == "search":
        return {}
    shutil.rmtree(work / task / "final", ignore_errors=True)  # a rerun must not resume last time's run
    ours = full_run(cfg, chosen["lr"], work / task / "final", test_file)
    return {
        "task": task, "steps_per_full_run": args.steps, "batches_per_epoch": costs.per_epoch, "prior_lr": hp["lr"],
        "grid": grid, "grid_best": best, "grid_seconds": round(grid_s, 1), "grid_compute": grid_compute,
        "search": {"chosen": chosen, "source": outcome["source"], "seconds": search_s,
                   "compute": search_compute, "compute_share_of_grid": round(search_compute / grid_compute, 4),
                   "range_test": {k: outcome["range_test"][k] for k in ("suggestion", "candidates", "lr_at_min",
                                                                            "diverged_at", "stopped_by", "seconds")},
                   "trials": [{"lr": t["config"]["lr"], "steps": t["steps"],
                               "dev_losses": [c["dev_loss"] for c in t["curve"]], "stopped_early": t["stopped_early"]}
                              for t in trials]},
        "ours_full_run": ours, "ours_vs_grid_best": round(ours["dev_loss"] / best["dev_loss"] - 1, 4),
        "baselines": baselines,
    }


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# LR search benchmark: range test + ASHA vs a grid of full runs", "",
             f"- command: `{report['command']}`", f"- machine: {report['machine']}", f"- date: {report['date']}",
             f"- model: {report['model']}, LoRA at the priors' rank for every run (the benchmark's ASHA searches the LR only, "
             "to compare like with like against the LR grid; jobs search the rank too)",
             f"- wall-clock: grid {sum(t['grid_seconds'] for t in report['tasks']):.0f} s, search "
             f"{sum(t['search']['seconds'] for t in report['tasks']):.0f} s, final invocation {report['total_seconds']:.0f} s "
             "(phases run as separate invocations, results cached in --work)", "",
             "| task | grid best LR | grid best dev | ours (LR, r) | ours dev | vs grid | search compute / grid | "
             "search s / grid s | TRL 2e-5 dev | 2e-4 dev | ours test | TRL test | 2e-4 test |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["tasks"]:
        o, b, s = t["ours_full_run"], t["baselines"], t["search"]
        lines.append(
            f"| {t['task']} | {t['grid_best']['lr']:.2e} | {t['grid_best']['dev_loss']:.4f} | {o['lr']:.2e}, r{o['lora_r']} "
            f"| {o['dev_loss']:.4f} | {100 * t['ours_vs_grid_best']:+.2f}% | {100 * s['compute_share_of_grid']:.1f}% "
            f"| {s['seconds']:.0f} / {t['grid_seconds']:.0f} | {b['trl_default']['dev_loss']:.4f} "
            f"| {b['reference_miner']['dev_loss']:.4f} | {o['test_loss']:.4f} | {b['trl_default']['test_loss']:.4f} "
            f"| {b['reference_miner']['test_loss']:.4f} |")
    lines += ["", "Grid (dev loss by LR) and the range test's candidate rules:", ""]
    for t in report["tasks"]:
        lines.append(f"- {t['task']}: " + ", ".join(f"{r['lr']:.1e}: {r['dev_loss']:.4f}" for r in t["grid"]))
        rt = t["search"]["range_test"]
        lines.append("  - range test: " + ", ".join(f"{k} {v:.2e}" for k, v in rt["candidates"].items())
                     + f" (stopped: {rt['stopped_by']}); ASHA trials: " + ", ".join(
                         f"{x['lr']:.1e}{' (stopped)' if x['stopped_early'] else ''}"
                         for x in t["search"]["trials"]))
    lines += ["", "Dev loss: the validator's Instruct metric on the job's dev split (5% of the rows used, held out); "
              "test loss: the same metric on the task's test.json (400 rows). Compute: 3 x trained padded tokens + "
              "forward-only tokens (dev evaluations, range-test baseline), counted from the deterministic batches.",
              "Search wall-clock includes Ray Tune / Train V2 start-up per trial (CPU, shared machine)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=["instruct_wordplay", "instruct_pattern_induction"])
    p.add_argument("--model", default="pico-llama")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--grid-lo", type=float, default=2e-5)
    p.add_argument("--grid-hi", type=float, default=2e-2)
    p.add_argument("--rt-steps", type=int, default=24)
    p.add_argument("--rt-cached", type=int, default=8)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--work", default="/tmp/lr_search_bench")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-lock", action="store_true", help="the caller holds /tmp/miner-ray.lock already")
    p.add_argument("--phase", choices=["grid", "baselines", "search", "all"], default="all",
                   help="stop after this phase; each phase's results are kept in --work and reused")
    args = p.parse_args()
    t0 = time.time()
    model = BENCH / "models" / args.model
    tasks = [bench_task(t, model, args, Path(args.work)) for t in args.tasks]
    if args.phase != "all":
        return
    report = {"command": " ".join(["python"] + sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''} {_cpu()} (shared, 2 cores), "
                         f"python {platform.python_version()}", "model": args.model,
              "total_seconds": time.time() - t0, "settings": vars(args), "tasks": tasks}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_search.json").write_text(json.dumps(report, indent=1, default=str))
    write_markdown(report, out / "lr_search.md")
    print((out / "lr_search.md").read_text())


def _cpu() -> str:
    try:
        return subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
