"""Per task type: does a fixed CPU budget of training beat the base model on the validator's
metric? For every bench task whose type has a recipe (launch.RECIPES) and a metric
(evaluate.METRICS) - so a new task type joins by registering in both - train the base model
with the planner's hyperparameters for `--budget-s` seconds of wall time (the training
deadline; the same loop as a job, Ray Train local mode, one worker), then score base and
trained model on the task's test.json.

    nice -n 10 python -m benchmarks.task_types --budget-s 180 --out benchmarks/results/task_types.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"


def bench_tasks(root: Path) -> list[Path]:
    from trainers.evaluate import METRICS
    from trainers.launch import RECIPES

    tasks = []
    for task_dir in sorted(p for p in (root / "tasks").iterdir() if (p / "task.json").exists()):
        task_type = json.loads((task_dir / "task.json").read_text())["task_type"]
        if task_type in RECIPES and task_type in METRICS:
            tasks.append(task_dir)
    return tasks


def run_task(task_dir: Path, model: Path, budget_s: float, work: Path, overrides: dict, dev_rows: int = 64) -> dict:
    from transformers import AutoConfig

    from trainers.config import TrainConfig
    from trainers.evaluate import HIGHER_IS_BETTER, evaluate_path
    from trainers.launch import fit
    from tuning.priors import default_hparams, param_count_from_config

    meta = json.loads((task_dir / "task.json").read_text())
    task_type, dt = meta["task_type"], meta["dataset_type"]
    hp = {**default_hparams(param_count_from_config(AutoConfig.from_pretrained(model)), task_type), **overrides}
    cfg = TrainConfig(model_path=str(model), train_file=str(task_dir / "train.json"), dataset_type=dt,
                      task_type=task_type, run_dir=str(work / "runs"), run_name=task_dir.name, num_workers=0,
                      train_deadline=time.time() + budget_s, max_dev_rows=dev_rows, **hp)
    started = time.time()
    outcome = fit(cfg, work / task_dir.name)
    train_s = time.time() - started
    test = task_dir / "test.json"
    base = evaluate_path(model, model, test, dt, task_type)
    tuned = evaluate_path(outcome.model_dir, model, test, dt, task_type)
    better = tuned > base if task_type in HIGHER_IS_BETTER else tuned < base
    s = outcome.summary
    return {"task": task_dir.name, "task_type": task_type, "method": cfg.method, "lr": cfg.lr,
            "steps": s.get("steps"), "train_rows": s.get("train_rows"), "train_s": round(train_s, 1),
            "selected_dev": outcome.checkpoint_metrics.get("dev_loss"), "dev_rows": s.get("dev_rows"),
            "weights": outcome.checkpoint_metrics.get("weights", "trained"),
            "dev_gain": outcome.checkpoint_metrics.get("dev_gain"), "dev_gain_se": outcome.checkpoint_metrics.get("dev_gain_se"),
            "base": base, "trained": tuned,
            "beats_base": better}


def markdown(results: list[dict], args, started: str) -> str:
    lines = [
        "# Task types: trained vs base on test.json, fixed CPU budget",
        "",
        f"- Command: `nice -n 10 python -m benchmarks.task_types --budget-s {args.budget_s:g}`"
        f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        f"- Machine: {platform.node()} - {os.cpu_count()} CPU cores shared with other work, no GPU;"
        f" Python {platform.python_version()}",
        f"- Date: {started}",
        f"- Base model: `{args.model}`; hyperparameters from `tuning.priors.default_hparams` (the job planner's);"
        " training in Ray Train local mode (the job's loop), deadline = start + budget;"
        f" dev split {args.dev_rows} rows ({4 * args.dev_rows} for DPO: Recipe.dev_scale).",
        "- Metric: the validator's (Instruct/Chat: mean per-sample loss on labelled tokens; DPO: sigmoid DPO loss"
        " at beta 0.1 against the base, ln 2 = 0.6931 for the base itself). Lower is better.",
        "",
        "| task | type | method | LR | steps | train s | dev rows | published | dev gain (SE) | base | trained | beats base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gain = f"{r['dev_gain']:+.4f} ({r['dev_gain_se']:.4f})" if r.get("dev_gain") is not None else "-"
        lines.append(f"| {r['task']} | {r['task_type']} | {r['method']} | {r['lr']:.2g} | {r['steps']} | {r['train_s']}"
                     f" | {r['dev_rows']} | {r['weights']} | {gain} | {r['base']:.4f} | {r['trained']:.4f} | {'yes' if r['beats_base'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=180.0)
    parser.add_argument("--model", default=str(BENCH / "models" / "pico-llama"))
    parser.add_argument("--tasks", nargs="*", help="task folder names (default: every supported bench task)")
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--dev-rows", type=int, default=64, help="max dev rows (DPO: x4), 256 in a job")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiply the planner's LR (ablations)")
    args = parser.parse_args(argv)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tasks = [t for t in bench_tasks(BENCH) if not args.tasks or t.name in args.tasks]
    results = []
    with tempfile.TemporaryDirectory() as work:
        for task_dir in tasks:
            lr = None
            if args.lr_scale != 1.0:
                from transformers import AutoConfig

                from tuning.priors import default_hparams, param_count_from_config

                task_type = json.loads((task_dir / "task.json").read_text())["task_type"]
                n = param_count_from_config(AutoConfig.from_pretrained(args.model))
                lr = default_hparams(n, task_type)["lr"] * args.lr_scale
            r = run_task(task_dir, Path(args.model), args.budget_s, Path(work), {"lr": lr} if lr else {}, args.dev_rows)
            print(json.dumps(r), flush=True)
            results.append(r)
    table = markdown(results, args, started)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0 if all(r["beats_base"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
