"""Quality techniques at equal wall-clock: the validator metric on test.json per recipe config.

For each bench task (Instruct, Chat, DPO), on one base model on CPU, every config trains with
the job's loop (trainers.launch.fit, Ray Train local mode, one worker) until the same
wall-clock deadline (start + --budget-s, set-up included), then the exported checkpoint is
scored with the validator metric of trainers.evaluate on the task's full test.json (tokenised,
and for DPO the base's reference log-probs computed, once per task: see TestSet). Configs:
  a_reference  the reference miner: LoRA r8/a16, lr 2e-4, seq 512, 10 steps, warm-up over them;
  b_trl        TRL defaults: full FT, SFT lr 2e-5 / DPO 1e-6, 1 epoch, decay to 0, no warm-up;
  c_strong     a strong fixed recipe for a small model: full FT, lr 1e-4 (DPO 1.35e-5), cosine to 0.25x;
  ours         the job planner's hyperparameters (tuning.priors.default_hparams), no technique;
  d_*          ours + one technique (TrainConfig fields); d_last_layers: full FT of the last 2 layers;
  e_all        ours + every technique; e_kept: the planner's hyperparameters + the KEPT candidates.
All share the dev split (trainers.dev_split), micro-batch size and the number of dev evaluations.
Training rows are a seeded subset (--rows) of train.json: no config gets through more in the budget.
Results are appended to --jsonl as they come (a rerun skips what is there), then tabulated.

    nice -n 10 python -m benchmarks.quality --budget-s 25 --seeds 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "bench"
RESULTS = REPO / "benchmarks" / "results"
TASKS = ["instruct_wordplay", "chat_topical_dialogue", "dpo_fact_verification"]
SAVES = 6

TECHNIQUES = {
    "d_ema": {"ema": True},
    "d_soup": {"soup": True},
    "d_rollback": {"rollback": True},
    "d_rslora": {"lora_rslora": True},
    "d_dora": {"lora_dora": True},
    "d_mlp_rank": {"lora_mlp_r": 32},  # MLP rank 2x the attention rank (16)
    "d_layer_rank": {"lora_layer_rank": "probe"},  # per-layer rank from a gradient-norm probe (SFT only)
    "d_dev_pass": {"dev_pass": True},
    "d_eval_share": {"eval_share": 0.05},  # fewer dev evaluations when they would eat > 5% of the window
}
# a method rather than an option of LoRA: full FT of the last 2 of pico-llama's 4 layers at the full-FT LR prior
LAST_LAYERS = {"method": "last_layers", "last_layers": 2}
# e_kept: the planner's hyperparameters plus these candidates (none is on by default yet: results/quality.md)
KEPT = ("d_dev_pass", "d_layer_rank", "d_eval_share")


def configs(task_type: str, n_params: int) -> dict[str, dict]:
    from tuning.priors import default_hparams

    dpo = task_type == "DpoTask"
    # the planner's hyperparameters with every technique off (the planner now turns rsLoRA on for small SFT jobs)
    planner = {**default_hparams(n_params, task_type), "saves": SAVES}
    ours = {**planner, "lora_rslora": False, "dev_pass": False, "eval_share": 0.0}
    techniques = {k: v for k, v in TECHNIQUES.items() if not (dpo and "lora_layer_rank" in v)}
    out = {
        "a_reference": {"method": "lora", "lora_r": 8, "lora_alpha": 16, "lr": 2e-4, "max_seq_len": 512,
                        "max_steps": 10, "warmup_fraction": 1.0, "saves": 1},
        "b_trl": {"method": "full", "lr": 1e-6 if dpo else 2e-5, "epochs": 1.0, "warmup_fraction": 0.0,
                  "min_lr_ratio": 0.0, "saves": SAVES},
        "c_strong": {"method": "full", "lr": 1.35e-5 if dpo else 1e-4, "warmup_fraction": 0.03,
                     "min_lr_ratio": 0.25, "epochs": 3.0, "saves": SAVES},
        "ours": ours,
    }
    out.update({name: {**ours, **extra} for name, extra in techniques.items()})
    out["d_last_layers"] = {**ours, **LAST_LAYERS, "lr": default_hparams(n_params, task_type, "full")["lr"]}
    # e_all: every LoRA technique switched on; e_kept: the planner's defaults (rsLoRA where measured)
    # plus the techniques the default pipeline keeps
    out["e_all"] = {**ours, **{k: v for extra in techniques.values() for k, v in extra.items()}}
    out["e_kept"] = {**planner, **{k: v for name in KEPT if name in techniques for k, v in techniques[name].items()}}
    return out


def subset(task_dir: Path, rows: int, work: Path) -> Path:
    data = json.loads((task_dir / "train.json").read_text())
    random.Random(0).shuffle(data)
    path = work / f"{task_dir.name}-{rows}.json"
    path.write_text(json.dumps(data[:rows]))
    return path


class TestSet:
    """A task's test.json tokenised once (and, for DPO, with the base model's reference log-probs
    filled once): the numbers of trainers.evaluate.evaluate_path without redoing the shared part
    for every run."""

    def __init__(self, task_dir: Path, model: Path):
        from trainers.batching import make_batches
        from trainers.dpo import fill_reference
        from trainers.evaluate import BATCH_TOKENS, load_submission
        from trainers.formats import max_length, tokenize_rows
        from trainers.modeling import load_tokenizer

        meta = json.loads((task_dir / "task.json").read_text())
        self.task_type = meta["task_type"]
        base = load_submission(model)
        tokenizer = load_tokenizer(str(model))
        self.pad_id = tokenizer.pad_token_id
        rows = json.loads((task_dir / "test.json").read_text())
        self.examples, _ = tokenize_rows(self.task_type, rows, meta["dataset_type"], tokenizer,
                                         max_length(self.task_type, base.config))
        if self.task_type == "DpoTask":
            for batch in make_batches(self.examples, BATCH_TOKENS, 16, seed=0):
                fill_reference(base, batch, self.pad_id, torch.device("cpu"))
        self.base = self.score(base)

    def score(self, model) -> float:
        from trainers.dpo import DPO
        from trainers.evaluate import BATCH_TOKENS
        from trainers.instruct import SFT, dev_loss

        recipe = DPO if self.task_type == "DpoTask" else SFT
        return dev_loss(model, self.examples, self.pad_id, torch.device("cpu"), BATCH_TOKENS, recipe)

    def score_path(self, path: Path) -> float:
        from trainers.evaluate import load_submission

        return self.score(load_submission(path))


def run_one(task_dir: Path, model: Path, name: str, hp: dict, seed: int, budget_s: float, train_file: Path,
            work: Path, test: TestSet) -> dict:
    from trainers.config import TrainConfig
    from trainers.launch import fit

    meta = json.loads((task_dir / "task.json").read_text())
    started = time.time()
    cfg = TrainConfig(model_path=str(model), train_file=str(train_file), dataset_type=meta["dataset_type"],
                      task_type=meta["task_type"], run_dir=str(work / "runs"), run_name=f"{task_dir.name}-{name}-{seed}",
                      num_workers=0, train_deadline=started + budget_s, seed=seed, max_dev_rows=128,
                      batch_tokens=2048, **hp)
    outcome = fit(cfg, work / "out")
    wall = time.time() - started
    metric = test.score_path(outcome.model_dir)
    s = outcome.summary
    return {"task": task_dir.name, "config": name, "seed": seed, "test": metric, "steps": s.get("steps"),
            "selected_dev": outcome.checkpoint_metrics.get("dev_loss"),
            "weights": outcome.checkpoint_metrics.get("weights", "raw"),
            "rollbacks": sum(1 for h in s.get("history", []) if "rollback_to" in h),
            "wall_s": round(wall, 1), "hp": hp}


def summarise(runs: list[dict], bases: dict) -> dict:
    """Per task and config: mean and spread over seeds (and mean optimizer steps); per config:
    mean ratio to b, c and ours."""
    cells: dict = {}
    for r in runs:
        cells.setdefault(r["task"], {}).setdefault(r["config"], []).append(r)
    table = {t: {c: {"mean": statistics.mean(x["test"] for x in v), "n": len(v),
                     "spread": max(x["test"] for x in v) - min(x["test"] for x in v),
                     "steps": statistics.mean(x["steps"] for x in v)} for c, v in cs.items()}
             for t, cs in cells.items()}
    ratios: dict = {}
    for t, cs in table.items():
        for c, cell in cs.items():
            for ref in ("b_trl", "c_strong", "ours"):
                if ref in cs:
                    ratios.setdefault(c, {}).setdefault(ref, []).append(cell["mean"] / cs[ref]["mean"])
    mean_ratio = {c: {ref: statistics.mean(v) for ref, v in rs.items()} for c, rs in ratios.items()}
    return {"table": table, "mean_ratio": mean_ratio, "base": bases}


def verdicts(table: dict) -> dict:
    """A technique helps on a task when its mean is below ours by more than the larger of the
    two seed spreads (max - min); hurts when above by that much; else within noise."""
    out = {}
    for name in list(TECHNIQUES) + ["d_last_layers", "e_all", "e_kept"]:
        out[name] = {}
        for t, cs in table.items():
            if name in cs and "ours" in cs and min(cs[name]["n"], cs["ours"]["n"]) < 2:
                out[name][t] = "one seed only"
            elif name in cs and "ours" in cs:
                diff = cs[name]["mean"] - cs["ours"]["mean"]
                noise = max(cs[name]["spread"], cs["ours"]["spread"])
                out[name][t] = "helps" if diff < -noise else "hurts" if diff > noise else "noise"
    return out


def markdown(summary: dict, meta: dict) -> str:
    table, names = summary["table"], None
    lines = ["# Quality techniques at equal wall-clock (pico-llama, CPU)", "",
             f"- Command: `{meta['command']}`", f"- Machine: {meta['machine']}", f"- Date: {meta['date']}",
             f"- Seeds: {meta['seeds']}; budget {meta['budget_s']} s wall-clock per run (set-up included);"
             f" {meta['rows']} training rows per task (seeded subset); total wall-clock {meta['total_s']} s.",
             *([f"- Load: {meta['load']}"] if meta.get("load") else []),
             "- Metric: the validator's on the full test.json (Instruct/Chat: mean per-sample CE on labelled"
             " tokens; DPO: sigmoid DPO loss at beta 0.1 vs the base, ln 2 for the base). Lower is better."
             " Cells: mean over seeds (max - min).", ""]
    for t, cs in table.items():
        names = names or list(cs)
    header = ["config"] + list(table) + ["/ b_trl", "/ c_strong", "/ ours"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| base model | " + " | ".join(f"{summary['base'][t]:.4f}" for t in table) + " | | | |")
    for c in names or []:
        cells = [f"{table[t][c]['mean']:.4f} ({table[t][c]['spread']:.4f})" if c in table[t] else "-" for t in table]
        r = summary["mean_ratio"].get(c, {})
        lines.append(f"| {c} | " + " | ".join(cells) + " | " +
                     " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in ("b_trl", "c_strong", "ours")) + " |")
    lines += ["", "Mean optimizer steps reached in the budget:", "",
              "| config | " + " | ".join(table) + " |", "|" + "---|" * (len(table) + 1)]
    for c in names or []:
        lines.append(f"| {c} | " + " | ".join(f"{table[t][c]['steps']:.0f}" if c in table[t] else "-" for t in table) + " |")
    lines += ["", "Verdict per technique vs `ours` (gain beyond the larger seed spread):", ""]
    for name, v in summary["verdicts"].items():
        if not v:
            continue
        lines.append(f"- {name}: " + ", ".join(f"{t} {x}" for t, x in v.items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=25.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--model", default=str(BENCH / "models" / "pico-llama"))
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--configs", nargs="*", help="only these configs (default: all)")
    parser.add_argument("--jsonl", default=str(RESULTS / "raw" / "quality_runs.jsonl"))
    parser.add_argument("--out", default=str(RESULTS / "quality"))
    parser.add_argument("--report-only", action="store_true",
                        help="retabulate --jsonl with the base metrics and meta of the existing --out.json")
    args = parser.parse_args(argv)
    if args.report_only:
        old = json.loads(Path(args.out + ".json").read_text())
        runs = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines()]
        return write(runs, old["base"], {**old["meta"], "seeds": sorted({r["seed"] for r in runs})}, args.out)
    from transformers import AutoConfig

    from tuning.priors import param_count_from_config

    started, t0 = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), time.time()
    model = Path(args.model)
    n_params = param_count_from_config(AutoConfig.from_pretrained(model))
    jsonl = Path(args.jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    runs = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    done = {(r["task"], r["config"], r["seed"]) for r in runs}
    bases = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for task in args.tasks:
            task_dir = BENCH / "tasks" / task
            task_type = json.loads((task_dir / "task.json").read_text())["task_type"]
            test = TestSet(task_dir, model)
            bases[task] = test.base
            train_file = subset(task_dir, args.rows, work)
            for seed in args.seeds:
                for name, hp in configs(task_type, n_params).items():
                    if (args.configs and name not in args.configs) or (task, name, seed) in done:
                        continue
                    r = run_one(task_dir, model, name, hp, seed, args.budget_s, train_file, work, test)
                    print(json.dumps(r), flush=True)
                    with jsonl.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    runs.append(r)
    meta = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} nice -n 10 python -m "
                       f"benchmarks.quality --budget-s {args.budget_s:g} --seeds {' '.join(map(str, args.seeds))}"
                       f" --rows {args.rows}",
            "machine": f"{platform.node()}: {os.cpu_count()} CPU cores shared with other work, no GPU; Python "
                       f"{platform.python_version()}",
            "date": started, "seeds": args.seeds, "budget_s": args.budget_s, "rows": args.rows,
            "total_s": round(time.time() - t0), "model": str(model)}
    return write([r for r in runs if r["task"] in args.tasks], bases, meta, args.out)


def write(runs: list[dict], bases: dict, meta: dict, out: str) -> int:
    summary = summarise(runs, bases)
    summary["verdicts"] = verdicts(summary["table"])
    Path(out + ".json").write_text(json.dumps({"meta": meta, **summary, "runs": runs}, indent=1))
    md = Path(out + ".md")
    findings = md.read_text().partition("\n## Findings")[2] if md.exists() else ""  # hand-written: kept
    md.write_text(markdown(summary, meta) + ("\n## Findings" + findings if findings else ""))
    print(Path(out + ".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
