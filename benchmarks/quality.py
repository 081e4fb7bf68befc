"""Quality techniques at equal wall-clock: the validator metric on test.json per recipe config.

For each bench task (Instruct, Chat, DPO, GRPO), on one base model (CPU, or the GPU when there is
one), every config trains with the job's loop (trainers.launch.fit, Ray Train local mode, one
worker) until the same wall-clock deadline (start + --budget-s, set-up included), then the exported
checkpoint is scored with the validator metric on the task's test.json (tokenised, and for DPO the
base's reference log-probs computed, once per task: see TestSet; GRPO: sampled completions scored
by the task's reward functions in the sandbox, minus beta x KL). Configs:
  a_reference  the reference miner: LoRA r8/a16, lr 2e-4, seq 512, 10 steps, warm-up over them;
  b_trl        TRL defaults: full FT, SFT lr 2e-5 / DPO and GRPO 1e-6, 1 epoch, decay to 0, no warm-up;
  c_strong     a strong fixed recipe for a small model: full FT, lr 1e-4 (DPO 1.35e-5, GRPO 1e-5), cosine to 0.25x;
  ours         the job planner's hyperparameters (tuning.priors.default_hparams), no technique;
  d_*          ours + one technique (TrainConfig fields); d_last_layers: full FT of the last 2 layers;
  e_all        ours + every technique; e_kept: the planner's hyperparameters + the KEPT candidates.
GRPO runs TRL's loop: only the LoRA options and the methods apply to it (the rest are SFT/DPO loop features).
All share the dev split (trainers.dev_split), micro-batch size and the number of dev evaluations.
Training rows are a seeded subset (--rows) of train.json: no config gets through more in the budget.
Results are appended to --jsonl as they come (a rerun skips what is there), then tabulated by
benchmarks/quality_report.py. `--shard K/N` runs every N-th run from the K-th, so N processes can share
one GPU (each its own --jsonl; tabulate them together with --report-only --jsonl a b ...).

    nice -n 10 python -m benchmarks.quality --budget-s 25 --seeds 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.quality_report import write

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "bench"
RESULTS = REPO / "benchmarks" / "results"
TASKS = ["instruct_wordplay", "instruct_pattern_induction", "chat_topical_dialogue", "dpo_fact_verification",
         "dpo_logical_reasoning", "grpo_arithmetic"]
SAVES = 6
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# GRPO's per-step shape, as benchmarks/grpo_task.py: 32 prompts x 2 completions of up to 16 tokens
GRPO_EXTRA = {"prompts_per_step": 32, "max_completion_length": 16, "dev_prompts": 32, "dev_max_completion": 16}
GRPO_TEST_TOKENS = 16

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
GRPO_TECHNIQUES = ("d_rslora", "d_dora", "d_mlp_rank")  # what TRL's GRPO loop honours (the adapter's shape)
# a method rather than an option of LoRA: full FT of the last 2 layers at the full-FT LR prior
LAST_LAYERS = {"method": "last_layers", "last_layers": 2}
# e_kept: the planner's hyperparameters, which hold what the default pipeline keeps (rsLoRA on small SFT
# jobs, the evaluation share), plus these candidates (none at present: results/quality_gpu_*.md)
KEPT: tuple[str, ...] = ()


def configs(task_type: str, n_params: int) -> dict[str, dict]:
    from tuning.priors import TASK_LR_SCALE, default_hparams, lr_prior

    dpo, grpo = task_type == "DpoTask", task_type == "GrpoTask"
    # the planner's hyperparameters with every technique off (the planner now turns rsLoRA on for small SFT jobs)
    planner = {**default_hparams(n_params, task_type), "saves": SAVES}
    ours = {**planner, "lora_rslora": False, "dev_pass": False, "eval_share": 0.0}  # every technique off
    techniques = {k: v for k, v in TECHNIQUES.items()
                  if not (dpo and "lora_layer_rank" in v) and (not grpo or k in GRPO_TECHNIQUES)}
    out = {
        "a_reference": {"method": "lora", "lora_r": 8, "lora_alpha": 16, "lr": 2e-4, "max_seq_len": 512,
                        "max_steps": 10, "warmup_fraction": 1.0, "saves": 1},
        "b_trl": {"method": "full", "lr": 1e-6 if dpo or grpo else 2e-5, "epochs": 1.0, "warmup_fraction": 0.0,
                  "min_lr_ratio": 0.0, "saves": SAVES},
        "c_strong": {"method": "full", "lr": 1.35e-5 if dpo else 1e-5 if grpo else 1e-4, "warmup_fraction": 0.03,
                     "min_lr_ratio": 0.25, "epochs": 3.0, "saves": SAVES},
        "ours": ours,
    }
    out.update({name: {**ours, **extra} for name, extra in techniques.items()})
    # at the full-FT prior as measured (quality.md), before Instruct/Chat full fine-tunes took 2.5x
    out["d_last_layers"] = {**ours, **LAST_LAYERS, "lr": lr_prior(n_params, "full") * TASK_LR_SCALE.get(task_type, 1.0)}
    # e_all: every LoRA technique switched on; e_kept: the planner's defaults (rsLoRA where measured)
    # plus the techniques the default pipeline keeps
    out["e_all"] = {**ours, **{k: v for extra in techniques.values() for k, v in extra.items()}}
    out["e_kept"] = {**planner, **{k: v for name in KEPT if name in techniques for k, v in techniques[name].items()}}
    return out


def subset(task_dir: Path, rows: int, work: Path) -> Path:
    data = json.loads((task_dir / "train.json").read_text())
    random.Random(0).shuffle(data)
    path = work / f"{task_dir.name}-{rows}.json"
    path.write_text(json.dumps(data[:rows] if rows else data))
    return path


class TestSet:
    """A task's test.json prepared once: tokenised (and, for DPO, with the base model's reference
    log-probs filled) for trainers.evaluate's numbers without redoing the shared part every run;
    GRPO keeps the rows for trainers.grpo_eval.score_model (its reward sandbox starts per score)."""

    def __init__(self, task_dir: Path, model: Path, grpo_rows: int):
        from trainers.evaluate import fill_references, load_submission
        from trainers.formats import tokenize_task
        from trainers.modeling import load_tokenizer

        self.meta = json.loads((task_dir / "task.json").read_text())
        self.task_type, self.model = self.meta["task_type"], model
        self.higher_better = self.task_type == "GrpoTask"
        rows = json.loads((task_dir / "test.json").read_text())
        if self.higher_better:
            self.rows = rows[:grpo_rows] if grpo_rows else rows
            self.base = self.score_path(model)
            return
        base = load_submission(model).to(DEVICE)
        tokenizer = load_tokenizer(str(model))
        self.pad_id = tokenizer.pad_token_id
        self.examples = tokenize_task(self.task_type, rows, self.meta["dataset_type"], tokenizer, base.config).examples
        if self.task_type == "DpoTask":
            fill_references(base, self.examples, self.pad_id)
        # a task.json carrying kl_coef is a KL-weighted Instruct task: scored loss + kl_coef x KL(model || base)
        self.kl_coef = float(self.meta.get("kl_coef") or 0.0)
        self.base_model = base if self.kl_coef else None
        self.base = self.score(base)

    def score(self, model) -> float:
        from trainers.evaluate import BATCH_TOKENS, mean_kl_to_base
        from trainers.instruct import dev_loss

        # a float, not its DevMetric
        loss = float(dev_loss(model, self.examples, self.pad_id, DEVICE, BATCH_TOKENS, self.recipe))
        return loss + self.kl_coef * mean_kl_to_base(model, self.base_model, self.examples) if self.kl_coef else loss

    def per_sample(self, model) -> list[float]:
        """Each test example's metric, in test.json order (of the rows tokenize_rows kept): Instruct/Chat
        the mean CE over its label tokens, DPO the pair's loss against the base; score() is their mean."""
        from trainers.evaluate import BATCH_TOKENS
        from trainers.instruct import sample_losses

        return sample_losses(model, self.examples, self.pad_id, DEVICE, BATCH_TOKENS, self.recipe)

    @property
    def recipe(self):
        from trainers.dpo import DPO
        from trainers.instruct import SFT

        return DPO if self.task_type == "DpoTask" else SFT

    def per_sample_path(self, path: Path) -> list[float]:
        """per_sample of a model folder (full or adapter), loaded as the validator loads it."""
        from trainers.evaluate import load_submission

        return self.per_sample(load_submission(path).to(DEVICE))

    def score_path(self, path: Path) -> float:
        from trainers.evaluate import load_submission
        from trainers.grpo_eval import score_model

        model = load_submission(path).to(DEVICE)
        if self.higher_better:
            return score_model(model, str(self.model), self.rows, self.meta["dataset_type"],
                               max_new_tokens=GRPO_TEST_TOKENS, seed=1234).score
        return self.score(model)


def run_one(task_dir: Path, model: Path, name: str, hp: dict, seed: int, budget_s: float, train_file: Path,
            work: Path, test: TestSet, out: Path | None = None, per_sample: bool = False) -> dict:
    """One config trained to the deadline and scored on test.json. The model is exported to `out`
    (default: work/out, which the next run overwrites); `per_sample` (loss tasks) also records each
    test example's metric ("losses"), whose mean is the score."""
    from trainers.config import TrainConfig
    from trainers.seed_soup import fit_with_soup

    meta = test.meta
    # on the GPU torch.compile's warm-up would take most of a short budget, for every config alike
    extra = {"compile": False} if DEVICE.type == "cuda" else {}
    if meta["task_type"] == "GrpoTask":
        extra.update(GRPO_EXTRA, **({"cpu_threads": 1} if DEVICE.type == "cpu" else {}))
    started = time.time()
    # one run name per budget too: fit() resumes a run directory of the same name
    cfg = TrainConfig(model_path=str(model), train_file=str(train_file), dataset_type=meta["dataset_type"],
                      task_type=meta["task_type"], run_dir=str(work / "runs"),
                      run_name=f"{task_dir.name}-{name}-{seed}-{budget_s:g}s",
                      num_workers=0, use_gpu=DEVICE.type == "cuda", train_deadline=started + budget_s, seed=seed,
                      max_dev_rows=128, batch_tokens=2048, extra=extra, **hp)
    outcome = fit_with_soup(cfg, out or work / "out")  # one run unless cfg.soup_runs > 1 and more fit
    wall = time.time() - started
    losses = test.per_sample_path(outcome.model_dir) if per_sample else None
    metric = sum(losses) / len(losses) if per_sample else test.score_path(outcome.model_dir)
    s = outcome.summary
    return {"task": task_dir.name, "config": name, "seed": seed, "test": metric, "base": test.base,
            **({"losses": losses, "model_dir": str(outcome.model_dir)} if per_sample else {}),
            "higher_better": test.higher_better, "steps": s.get("steps"),
            "selected_dev": outcome.checkpoint_metrics.get("dev_loss"),
            "weights": outcome.checkpoint_metrics.get("weights", "raw"),
            "rollbacks": sum(1 for h in s.get("history", []) if "rollback_to" in h), "soup": s.get("soup"),
            "wall_s": round(wall, 1), "t_start": round(started, 1), "t_end": round(time.time(), 1), "hp": hp}


def machine() -> str:
    import transformers

    gpu = f"{torch.cuda.get_device_name()}, CUDA " if DEVICE.type == "cuda" else "no GPU, "
    return (f"{platform.node()}: {os.cpu_count()} CPU cores, {gpu}torch {torch.__version__}, transformers "
            f"{transformers.__version__}; Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=25.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=1000, help="training rows per task (0: all)")
    parser.add_argument("--grpo-test-rows", type=int, default=0, help="GRPO test prompts scored (0: all)")
    parser.add_argument("--bench", default=str(BENCH), help="the folder holding tasks/ and models/")
    parser.add_argument("--model", default="pico-llama", help="a folder under <bench>/models, or a path")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--configs", nargs="*", help="only these configs (default: all)")
    parser.add_argument("--shard", default="0/1", help="K/N: this process runs every N-th run from the K-th")
    parser.add_argument("--jsonl", nargs="+", default=[str(RESULTS / "raw" / "quality_runs.jsonl")],
                        help="where runs are appended (one file); with --report-only, every file to tabulate")
    parser.add_argument("--out", default=str(RESULTS / "quality"))
    parser.add_argument("--report-only", action="store_true", help="tabulate the --jsonl files, train nothing")
    parser.add_argument("--load", default="", help="a line on the machine's load, for the report")
    parser.add_argument("--command", default="", help="the command that made the runs, for the report")
    parser.add_argument("--stop-by", type=float, default=0.0,
                        help="unix time: start no run that could not end by then (the shard's log counts those left)")
    args = parser.parse_args(argv)
    bench = Path(args.bench)
    model = bench / "models" / args.model if (bench / "models" / args.model).is_dir() else Path(args.model)
    runs = [json.loads(line) for f in args.jsonl if Path(f).exists() for line in Path(f).read_text().splitlines()]
    if not args.report_only:
        runs += train(args, bench, model, runs)
    failed = [r for r in runs if "error" in r]
    runs = [r for r in runs if r["task"] in args.tasks and "error" not in r]
    if not runs:
        raise SystemExit("no runs to tabulate")
    t0, t1 = min(r.get("t_start", 0) for r in runs), max(r.get("t_end", 0) for r in runs)
    when = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: E731
    meta = {"command": args.command or "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": runs[-1].get("machine", machine()), "device": runs[-1].get("device", DEVICE.type),
            "model": model.name, "date": f"{when(t0)} - {when(t1)}" if t0 else "see git history",
            "seeds": sorted({r["seed"] for r in runs}), "budget_s": args.budget_s, "rows": args.rows or "all",
            "total_s": round(t1 - t0) if t0 else "-", "load": args.load,
            "failed": [f"{r['task']} {r['config']} seed {r['seed']}: {r['error']}" for r in failed]}
    techniques = list(TECHNIQUES) + ["d_last_layers", "e_all", "e_kept"]
    return write(runs, meta, args.out, techniques, TASKS + ["a_reference", "b_trl", "c_strong", "ours"] + techniques)


class Runs:
    """What one process's runs share: each task's TestSet and training subset (made at its first
    run) and the task types already warmed up: a process's first run of a task type pays imports,
    CUDA/kernel warm-up and caches, so a short unrecorded run goes first."""

    def __init__(self, bench: Path, model: Path, rows: int, grpo_test_rows: int, work: Path):
        from transformers import AutoConfig

        from tuning.priors import param_count_from_config

        self.bench, self.model, self.rows, self.grpo_test_rows, self.work = bench, model, rows, grpo_test_rows, work
        self.n_params = param_count_from_config(AutoConfig.from_pretrained(model))
        self.tests: dict[str, tuple[TestSet, Path]] = {}
        self.warm: set[str] = set()

    def task_type(self, task: str) -> str:
        return json.loads((self.bench / "tasks" / task / "task.json").read_text())["task_type"]

    def configs(self, task: str) -> dict[str, dict]:
        return configs(self.task_type(task), self.n_params)

    def test(self, task: str) -> TestSet:
        task_dir = self.bench / "tasks" / task
        if task not in self.tests:
            self.tests[task] = (TestSet(task_dir, self.model, self.grpo_test_rows),
                                subset(task_dir, self.rows, self.work))
        return self.tests[task][0]

    def run(self, task: str, name: str, hp: dict, seed: int, budget_s: float, **run_one_options) -> dict:
        """run_one's record, or the run's error (one failing run is recorded, the others go on)."""
        task_dir = self.bench / "tasks" / task
        try:
            test, train_file = self.test(task), self.tests[task][1]
            if test.task_type not in self.warm:
                self.warm.add(test.task_type)
                run_one(task_dir, self.model, "warm-up", self.configs(task)["ours"], seed, min(8.0, budget_s),
                        train_file, self.work, test)
            r = run_one(task_dir, self.model, name, hp, seed, budget_s, train_file, self.work, test, **run_one_options)
        except Exception as e:  # noqa: BLE001 - a benchmark row, reported in the table as failed
            r = {"task": task, "config": name, "seed": seed, "error": f"{type(e).__name__}: {e}"[:500]}
        r.update(machine=machine(), device=DEVICE.type, model=self.model.name)
        return r


def train(args, bench: Path, model: Path, done_runs: list[dict]) -> list[dict]:
    """This shard's runs not in the jsonl yet, each appended to it as it ends."""
    k, n = (int(x) for x in args.shard.split("/"))
    jsonl = Path(args.jsonl[0])
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["task"], r["config"], r["seed"]) for r in done_runs}
    new = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Runs(bench, model, args.rows, args.grpo_test_rows, Path(tmp))
        todo = [(t, c, seed, hp) for seed in args.seeds for t in args.tasks for c, hp in runs.configs(t).items()
                if not (args.configs and c not in args.configs)]
        mine = [x for i, x in enumerate(todo) if i % n == k and x[:3] not in done]
        for i, (task, name, seed, hp) in enumerate(mine):
            if args.stop_by and time.time() + 1.5 * args.budget_s > args.stop_by:
                print(f"[quality {k}/{n}] --stop-by reached: {len(mine) - i} runs not started", flush=True)
                break
            r = runs.run(task, name, hp, seed, args.budget_s)
            print(f"[quality {k}/{n}] {i + 1}/{len(mine)} " + json.dumps(r), flush=True)
            with jsonl.open("a") as f:
                f.write(json.dumps(r) + "\n")
            new.append(r)
    return new


if __name__ == "__main__":
    raise SystemExit(main())
