"""KL-weighted Instruct: our default pipeline trained plainly vs trained for the weighted score.

A KL-weighted task (G.O.D, USE_KL=1, KL_COEF=c) is scored as eval_loss + c x mean per-token
KL(finetuned || base) over label tokens (trainers/evaluate.py: kl_weighted_terms). For each bench
Instruct/Chat task, each c and each seed, the default pipeline's hyperparameters train once with
`kl_coef=0` ("plain") and once with `kl_coef=c` ("kl_aware"), at equal wall-clock with
benchmarks/quality.py's run_one (same dev split, rows, budget, set-up included); both are scored by
the weighted metric on test.json. `--shard K/N` runs every N-th run (N processes can share a GPU).

    python -m benchmarks.kl_objective --budget-s 30 --seeds 1 2 3 --coefs 0.1 0.5 1.5
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean

from benchmarks.quality import BENCH, DEVICE, RESULTS, machine

TASKS = ["instruct_wordplay", "instruct_pattern_induction", "chat_topical_dialogue"]


def runs(tasks, coefs, seeds):
    return [(t, c, s, mode) for t in tasks for c in coefs for s in seeds for mode in ("plain", "kl_aware")]


def score(model_dir: Path, base_model: Path, task_dir: Path, base, coef: float) -> dict:
    """The weighted score of a model folder on the task's test.json, with its two parts."""
    from trainers.evaluate import kl_weighted_terms, load_submission

    meta = json.loads((task_dir / "task.json").read_text())
    loss, kl = kl_weighted_terms(load_submission(model_dir).to(DEVICE), str(base_model),
                                 json.loads((task_dir / "test.json").read_text()), meta["dataset_type"],
                                 meta["task_type"], base=base)
    return {"ce": loss, "kl": kl, "weighted": loss + coef * kl}


def train_and_score(args, bench: Path, model: Path, todo: list, out_jsonl: Path) -> None:
    """Each run through benchmarks.quality.Runs (a process's first run of a task type is an unrecorded
    warm-up: CUDA and kernel start-up would otherwise cut the first recorded run short)."""
    from benchmarks.quality import Runs
    from trainers.evaluate import load_submission

    work = Path(tempfile.mkdtemp(prefix="klobj-"))
    runs, bases = Runs(bench, model, args.rows, 0, work), {}
    for task, coef, seed, mode in todo:
        if task not in bases:
            bases[task] = load_submission(model).to(DEVICE).eval()
        hp = {**runs.configs(task)["e_kept"], "kl_coef": coef if mode == "kl_aware" else 0.0}
        out = work / f"{task}-{mode}-{coef}-{seed}"
        row = runs.run(task, f"{mode}-c{coef}", hp, seed, args.budget_s, out=out)
        row.update(coef=coef, mode=mode)
        if "error" not in row:  # the base's weighted score is its loss (no KL to itself)
            row.update(base_weighted=runs.test(task).base, **score(out, model, bench / "tasks" / task, bases[task], coef))
        with open(out_jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{task} c={coef} seed={seed} {mode}: {row.get('weighted', row.get('error'))}", flush=True)


def report(rows: list[dict], out: Path, command: str) -> None:
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    when = min((r["t_start"] for r in rows), default=time.time())
    lines = [f"# KL-weighted Instruct: plain vs KL-aware training ({datetime.fromtimestamp(when, timezone.utc):%Y-%m-%d %H:%M} UTC)",
             "", f"Machine: {rows[-1].get('machine', machine()) if rows else machine()}", f"Command: `{command}`", "",
             *([f"Failed runs: {[(r['task'], r.get('coef'), r['seed'], r.get('mode'), r['error']) for r in failed]}", ""]
               if failed else []),
             "Weighted score = CE + c x KL(finetuned || base) on test.json (lower is better), mean over seeds "
             "(min-max). `wins` = seeds where KL-aware < plain.", "",
             "| task | c | base | plain weighted | KL-aware weighted | plain CE / KL | KL-aware CE / KL | wins |",
             "|---|---:|---:|---:|---:|---|---|---:|"]
    summary = []
    for (task, coef) in sorted({(r["task"], r["coef"]) for r in rows}):
        by = {m: sorted((r for r in rows if r["task"] == task and r["coef"] == coef and r["mode"] == m),
                        key=lambda r: r["seed"]) for m in ("plain", "kl_aware")}
        if not by["plain"] or not by["kl_aware"]:
            continue
        seeds = {r["seed"] for r in by["plain"]} & {r["seed"] for r in by["kl_aware"]}
        pick = {m: [r for r in by[m] if r["seed"] in seeds] for m in by}
        w = {m: [r["weighted"] for r in pick[m]] for m in pick}
        wins = sum(a < b for a, b in zip(w["kl_aware"], w["plain"]))
        fmt = lambda xs: f"{mean(xs):.4f} ({min(xs):.4f}-{max(xs):.4f})"  # noqa: E731
        parts = {m: f"{mean(r['ce'] for r in pick[m]):.4f} / {mean(r['kl'] for r in pick[m]):.4f}" for m in pick}
        lines.append(f"| {task} | {coef} | {pick['plain'][0]['base_weighted']:.4f} | {fmt(w['plain'])} | "
                     f"{fmt(w['kl_aware'])} | {parts['plain']} | {parts['kl_aware']} | {wins}/{len(seeds)} |")
        summary.append({"task": task, "coef": coef, "plain": mean(w["plain"]), "kl_aware": mean(w["kl_aware"]),
                        "wins": wins, "seeds": len(seeds)})
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "runs": rows}, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=30.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--coefs", type=float, nargs="+", default=[0.1, 0.5, 1.5])
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--bench", default=str(BENCH))
    p.add_argument("--model", default="pico-llama")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--shard", default="0/1")
    p.add_argument("--jsonl", nargs="+", default=[str(RESULTS / "raw" / "kl_objective.jsonl")])
    p.add_argument("--out", default=str(RESULTS / "kl_objective"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--command", default="")
    args = p.parse_args(argv)
    bench = Path(args.bench)
    model = Path(args.model) if Path(args.model).is_dir() else bench / "models" / args.model
    if not args.report_only:
        k, n = (int(x) for x in args.shard.split("/"))
        out = Path(args.jsonl[0])
        out.parent.mkdir(parents=True, exist_ok=True)
        done = {(r["task"], r["coef"], r["seed"], r["mode"]) for r in _read(out)}
        todo = [r for i, r in enumerate(runs(args.tasks, args.coefs, args.seeds)) if i % n == k and r not in done]
        started = time.time()
        train_and_score(args, bench, model, todo, out)
        print(f"shard {args.shard}: {len(todo)} runs in {time.time() - started:.0f} s", flush=True)
    rows = [r for path in args.jsonl for r in _read(Path(path))]
    report(rows, Path(args.out), args.command or "python -m benchmarks.kl_objective")
    return 0


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    raise SystemExit(main())
