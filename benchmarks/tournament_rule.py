"""Would `ours` advance in a tournament? The validators' per-sample rule on our bench tasks.

In today's G.O.D tournaments an Instruct, DPO or Chat task is not won by a lower mean loss: the two
models' per-example losses on the same eval set are compared (validator/tournament/thresholds.py
@be1297c7, constants.py@0791bb6e; /tmp/god_research.md §8, docs/gradients-protocol.md §13):
  - examples non-finite on either side are dropped; gap = defender - challenger (+: challenger better);
    an example is decided when |gap| > 0.01 nats, and won by the side it favours;
  - boss round: the challenger takes the task when, at the one-sided 99% bootstrap lower bound
    (10,000 resamples of all examples, numpy default_rng(20260808), 1st percentile), it wins >= 55%
    of the decided examples AND its mean gap over all examples is >= max(0.01, 1% of the defender's
    mean loss), and it is not worse on the scalar (ranking) loss; nothing decided is a draw;
  - knockout rounds: the bare majority of decided examples advances (equal wins: the lower mean), but
    a sample winner worse on the scalar loss gives way to the lower-mean model.
`judge` is that rule on two vectors. The driver trains `ours`, `c_strong` and `b_trl`
(benchmarks/quality.py configs, same seed, equal wall-clock, each model folder kept), records each
one's per-example test losses (quality.TestSet.per_sample: Instruct/Chat mean CE over label tokens,
DPO the pair's sigmoid loss against the base) in --jsonl (a rerun trains only what is missing), and
judges ours (challenger) against each (defender): benchmarks/tournament_rule_report.py tabulates it.

    python -m benchmarks.tournament_rule --budgets 30 60 --seeds 1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.quality import BENCH, RESULTS

# validator/tournament/constants.py@0791bb6e (BOSS_ROUND_*)
DEADZONE_NATS = 0.01
MIN_WIN_RATE = 0.55
MIN_MEAN_GAP_NATS = 0.01
WIN_MARGIN = 0.01  # the relative floor of the required mean gap: 1% of the defender's mean loss
CONFIDENCE = 0.99
RESAMPLES = 10_000
SEED = 20260808  # fixed by the validators so that two of them always agree

ADVANCES, KEEPS, DRAW = "challenger advances", "defender keeps", "draw"
LOSS_TASKS = ["instruct_wordplay", "instruct_pattern_induction", "chat_topical_dialogue", "dpo_fact_verification",
              "dpo_logical_reasoning"]
CHALLENGER, DEFENDERS = "ours", ("c_strong", "b_trl")


@dataclass(frozen=True)
class Verdict:
    n: int                # comparable examples (finite on both sides)
    decided: int          # |gap| > the dead zone
    challenger_wins: int
    defender_wins: int
    win_rate: float       # challenger wins / decided (0 when none)
    win_rate_lb: float    # its bootstrap lower bound
    mean_gap: float       # mean of defender - challenger over all comparable examples
    mean_gap_lb: float
    required_gap: float   # max(0.01, 1% of |defender mean|)
    boss: str             # the boss round's verdict: ADVANCES, KEEPS or DRAW
    knockout: str         # a knockout round's: ADVANCES or KEEPS


def bootstrap_lower_bounds(gaps: np.ndarray, wins: np.ndarray, decided: np.ndarray, confidence: float = CONFIDENCE,
                           resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """One-sided lower bounds of the win rate and the mean gap, resampling all examples (ties
    included: which ones fall in the dead zone varies with the sample too). Drawn in the
    validators' chunks, so the random stream and the bounds are theirs exactly."""
    n = gaps.size
    rng = np.random.default_rng(seed)
    win_rates, mean_gaps = np.empty(resamples), np.empty(resamples)
    chunk = max(1, min(resamples, 2_000_000 // max(n, 1)))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        n_decided, n_wins = decided[idx].sum(axis=1), wins[idx].sum(axis=1)
        # a resample that decides nothing is no evidence for the challenger
        win_rates[start:start + size] = np.divide(n_wins, n_decided, out=np.zeros(size), where=n_decided > 0)
        mean_gaps[start:start + size] = gaps[idx].mean(axis=1)
    q = (1.0 - confidence) * 100.0
    return float(np.percentile(win_rates, q)), float(np.percentile(mean_gaps, q))


def judge(defender, challenger, defender_scalar: float | None = None, challenger_scalar: float | None = None,
          resamples: int = RESAMPLES) -> Verdict:
    """The tournament rule on two per-example loss vectors of the same eval set, in the same order.
    The scalars are the ranking losses (the validator's may carry a KL term); default: each
    vector's mean over its finite examples."""
    d, c = np.asarray(defender, dtype=np.float64), np.asarray(challenger, dtype=np.float64)
    if d.shape != c.shape:
        raise ValueError(f"paired vectors differ in length: defender {d.size}, challenger {c.size}")
    d_scalar = float(np.mean(d[np.isfinite(d)])) if defender_scalar is None else defender_scalar
    c_scalar = float(np.mean(c[np.isfinite(c)])) if challenger_scalar is None else challenger_scalar
    usable = np.isfinite(d) & np.isfinite(c)
    d, c = d[usable], c[usable]
    gaps = d - c
    wins, losses = gaps > DEADZONE_NATS, gaps < -DEADZONE_NATS
    decided = wins | losses
    n, n_decided, n_wins = int(gaps.size), int(decided.sum()), int(wins.sum())
    mean_gap = float(gaps.mean()) if n else 0.0
    required = max(MIN_MEAN_GAP_NATS, WIN_MARGIN * abs(float(d.mean()))) if n else MIN_MEAN_GAP_NATS
    win_rate_lb, mean_gap_lb = (bootstrap_lower_bounds(gaps, wins.astype(float), decided.astype(float),
                                                       resamples=resamples) if n else (0.0, 0.0))
    paired_win = n_decided > 0 and win_rate_lb >= MIN_WIN_RATE and mean_gap_lb >= required
    boss = DRAW if n_decided == 0 else ADVANCES if paired_win and c_scalar <= d_scalar else KEEPS
    # knockout: the majority of decided examples, equal wins to the lower scalar; a majority
    # winner worse on the scalar gives way to the lower one. Exact ties stay with the defender.
    majority = ADVANCES if n_wins > n_decided - n_wins else KEEPS if n_wins < n_decided - n_wins else None
    lower = ADVANCES if c_scalar < d_scalar else KEEPS
    worse = (majority == ADVANCES and c_scalar > d_scalar) or (majority == KEEPS and d_scalar > c_scalar)
    knockout = lower if majority is None or worse else majority
    return Verdict(n, n_decided, n_wins, n_decided - n_wins, n_wins / n_decided if n_decided else 0.0,
                   win_rate_lb, mean_gap, mean_gap_lb, required, boss, knockout)


def scored_tokens(ex) -> int:
    """The tokens an example's loss is taken over: an SFT example's labelled tokens, a pair's two
    completions (for the length analysis of the samples we lose)."""
    if hasattr(ex, "chosen"):
        return len(ex.chosen) + len(ex.rejected)
    return sum(1 for t in ex.labels if t != -100)


def key(r: dict) -> tuple:
    return r["task"], r["config"], r["seed"], float(r["budget_s"])


def ours_config(runs, task: str) -> dict:
    """The challenger is what the tournament entrypoint trains on this machine: the planner's
    hyperparameters (benchmarks/quality.py's e_kept) for the method the capacity planner picks for
    the visible GPUs (cluster/jobs/tournament_plan.py: a full fine-tune for a small model on a GPU, LoRA on
    the CPU), not the LoRA-only, techniques-off `ours` of the quality table."""
    from cluster.jobs.tournament_plan import TOURNAMENT_TRAIN_OPTIONS, detect_hardware, plan_run
    from tuning.priors import default_hparams

    task_type = runs.task_type(task)
    method = "full" if plan_run(runs.n_params, task_type, detect_hardware()).method == "full" else "lora"
    kept = runs.configs(task)["e_kept"]
    return {**kept, **default_hparams(runs.n_params, task_type, method), "saves": kept["saves"],
            **TOURNAMENT_TRAIN_OPTIONS}


# Alternative challengers, trained beside `ours` when asked (--alt): the candidates for a recipe change,
# judged against the same defenders in the same run. "lr_xK": ours at K x its LR; "lora": the planner's
# LoRA hyperparameters (what the tournament trains on a CPU, and what the quality benchmark measured);
# "guardK": ours with the base guard at K paired standard errors (trainers/averaging.clearly_better);
# "epK": K planned epochs; "lsK": DPO label smoothing K (cDPO); "soupK": up to K runs averaged (seed_soup.py; 1: one
# run); "shrink": a DPO full fine-tune shrunk toward the base by dev (dpo_shrink.py); "full": the planner's full
# fine-tune (what the tournament trains on a GPU), e.g. on a CPU beside its LoRA.
def alt_config(runs, task: str, name: str) -> dict:
    """`name`'s changes to ours, applied left to right; "+" joins several (e.g. full+lr_x1.6)."""
    from tuning.priors import default_hparams

    hp = ours_config(runs, task)
    scaled = {"lr_x": ("lr", lambda hp, k: hp["lr"] * k), "ep": ("epochs", lambda hp, k: k),
              "guard": ("base_margin_se", lambda hp, k: k), "ls": ("dpo_label_smoothing", lambda hp, k: k),
              "soup": ("soup_runs", lambda hp, k: int(k))}
    for part in name.split("+"):
        prefix = next((p for p in scaled if part.startswith(p)), None)
        try:
            if prefix:
                key, value = scaled[prefix]
                hp = {**hp, key: value(hp, float(part[len(prefix):]))}
            elif part == "shrink":
                hp = {**hp, "dpo_shrink": True}
            elif part in ("lora", "full"):
                hp = {**hp, **default_hparams(runs.n_params, runs.task_type(task), part), "saves": hp["saves"]}
            else:
                raise ValueError(part)
        except ValueError:
            raise SystemExit(f"unknown --alt {name!r}: lr_x<K>, ep<K>, guard<K>, ls<K>, soup<K>, shrink, lora, full, "
                             "joined by +") from None
    return hp


def challenger_config(runs, task: str, name: str) -> dict:
    return ours_config(runs, task) if name == CHALLENGER else alt_config(runs, task, name.removeprefix("ours_"))


def train(args, bench: Path, model: Path, done: dict[tuple, dict]) -> list[dict]:
    """The runs not in the jsonl yet (with their per-example losses), each appended as it ends;
    each model folder kept under --models."""
    from benchmarks.quality import Runs

    jsonl, models = Path(args.jsonl[0]), Path(args.models)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    new = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Runs(bench, model, args.rows, 0, Path(tmp))
        # ours and its two opponents one after the other per (task, budget): alike machine load
        challengers = [CHALLENGER, *(f"ours_{a}" for a in args.alt)]
        todo = [(t, c, s, b) for s in args.seeds for t in args.tasks for b in args.budgets
                for c in (*challengers, *DEFENDERS) if (t, c, s, float(b)) not in done]
        for i, (task, name, seed, budget) in enumerate(todo):
            out = models / model.name / f"{task}-{name}-{budget:g}s-seed{seed}"
            hp = runs.configs(task)[name] if name in DEFENDERS else challenger_config(runs, task, name)
            r = runs.run(task, name, hp, seed, budget, out=out, per_sample=True)
            r["budget_s"] = float(budget)
            if "error" not in r:
                r["tokens"] = [scored_tokens(ex) for ex in runs.test(task).examples]
            print(f"[tournament_rule] {i + 1}/{len(todo)} " + json.dumps({k: v for k, v in r.items()
                  if k not in ("losses", "tokens")}), flush=True)
            with jsonl.open("a") as f:
                f.write(json.dumps(r) + "\n")
            new.append(r)
    return new


def comparisons(runs: dict[tuple, dict], resamples: int = RESAMPLES) -> list[dict]:
    """ours (and any alternative challenger, ours_*) against each defender, per (task, budget, seed)
    where both ran."""
    out = []
    for (task, config, seed, budget), ours in sorted(runs.items()):
        if not config.startswith(CHALLENGER):
            continue
        for opponent in DEFENDERS:
            theirs = runs.get((task, opponent, seed, budget))
            if theirs is None:
                continue
            v = judge(theirs["losses"], ours["losses"], resamples=resamples)  # scalars: the means (no KL here)
            out.append({"task": task, "budget_s": budget, "seed": seed, "challenger": config, "opponent": opponent,
                        "ours": ours["test"],
                        "theirs": theirs["test"], **asdict(v)})
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.quality import machine
    from benchmarks.tournament_rule_report import write

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[30.0], help="wall-clock seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--rows", type=int, default=1000, help="training rows per task (0: all)")
    parser.add_argument("--bench", default=str(BENCH), help="the folder holding tasks/ and models/")
    parser.add_argument("--model", default="pico-llama", help="a folder under <bench>/models, or a path")
    parser.add_argument("--tasks", nargs="+", default=LOSS_TASKS)
    parser.add_argument("--jsonl", nargs="+", default=[str(RESULTS / "raw" / "judge_parity_runs.jsonl")],
                        help="where runs are appended (the first); runs already in any of them are not retrained")
    parser.add_argument("--models", default=str(RESULTS / "raw" / "judge_parity_models"),
                        help="where each run's exported model folder is kept")
    parser.add_argument("--out", default=str(RESULTS / "judge_parity_rule"))
    parser.add_argument("--report-only", action="store_true", help="judge the --jsonl runs, train nothing")
    parser.add_argument("--alt", nargs="*", default=[], help="alternative challengers also trained: lr_x<K>, ep<K> (epochs), guard<K>, ls<K> (DPO label smoothing), soup<K> (runs averaged), shrink (DPO toward the base), lora, full (joined by +)")
    parser.add_argument("--command", default="", help="the command that made the runs, for the report")
    args = parser.parse_args(argv)
    bench = Path(args.bench)
    model = bench / "models" / args.model if (bench / "models" / args.model).is_dir() else Path(args.model)
    records = [json.loads(line) for f in args.jsonl if Path(f).exists() for line in Path(f).read_text().splitlines()]
    done = {key(r): r for r in records if "error" not in r and "losses" in r}
    if not args.report_only:
        records += train(args, bench, model, done)
    failed = [r for r in records if "error" in r]
    runs = {key(r): r for r in records if "error" not in r and "losses" in r and r["task"] in args.tasks
            and float(r["budget_s"]) in args.budgets and r["seed"] in args.seeds}
    if not runs:
        raise SystemExit("no runs to judge")
    when = lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))  # noqa: E731
    t0, t1 = min(r["t_start"] for r in runs.values()), max(r["t_end"] for r in runs.values())
    last = max(runs.values(), key=lambda r: r["t_end"])
    meta = {"command": args.command or "python -m benchmarks.tournament_rule "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": last.get("machine", machine()), "device": last.get("device", "?"), "model": model.name,
            "date": f"{when(t0)} - {when(t1)}", "seeds": sorted({k[2] for k in runs}),
            "budgets": sorted({k[3] for k in runs}), "rows": args.rows or "all",
            "failed": [f"{r['task']} {r['config']} seed {r['seed']} {r.get('budget_s')} s: {r['error']}"
                       for r in failed]}
    return write(comparisons(runs), runs, meta, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
