"""Seed soups: the window's unspent time as more runs of the same recipe, averaged.

A full fine-tune of a small model often ends its planned epochs long before the window does (3
epochs of 1,000 rows of a 1 B model on one H100 take minutes; the tournament gives hours). More
epochs of one run overfit (judge_parity.md: 4 and 6 epochs lost wordplay). Instead, while another
whole run fits before the training deadline, the same recipe trains again from the base in another
batch order (`TrainConfig.order_seed`; the same dev split), and the runs' weights are averaged: a
uniform soup, which fine-tunes of one base by one recipe allow (they stay in one basin). The
average cancels part of each run's order noise, sample by sample, which the tournaments'
per-sample rule pays for (judge_parity.md, "Seed soups").

The average goes out when its dev metric (the validator's, computed here the same way for every
candidate) is no worse than the runs' mean: what the check catches is an average that left the
basin (then far worse than every run), and against the best run on a dev split of ~50-256 rows
the average would lose to the luckiest run's noise (on test the average beat every run of its soup in
the benchmark). Otherwise the best run on dev goes out. Full fine-tunes of
SFT and DPO tasks only: LoRA factors do not average into the average of their updates, and a GRPO
run is rarely shorter than its window.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from .config import TrainConfig
from .evaluate import BATCH_TOKENS
from .launch import TrainOutcome, export_checkpoint, fit

SOUP_TASKS = {"InstructTextTask", "ChatTask", "DpoTask"}
MARGIN = 1.25               # another run starts only when 1.25x the longest run so far still fits, and the finish
COPY_BYTES_S = 300e6        # averaging reads every run's weights and writes one more (a slow disk's rate)
FINISH_SLACK_S = 5.0


def soup_dir(cfg: TrainConfig) -> Path:
    """Where the later runs' models and the average go: beside the Ray Train runs (cleaned with them)."""
    return Path(cfg.run_dir) / f"{cfg.run_name}-soup"


def wants_soup(cfg: TrainConfig) -> bool:
    """More runs are worth training: a full SFT/DPO fine-tune, a deadline, a dev split to choose by."""
    return (cfg.soup_runs > 1 and cfg.method == "full" and cfg.task_type in SOUP_TASKS and cfg.train_deadline > 0
            and cfg.dev_fraction > 0)


def fit_with_soup(cfg: TrainConfig, out_dir: Path) -> TrainOutcome:
    """`fit`, then while a whole run more fits before cfg.train_deadline (and cfg.soup_runs allows),
    one more in another order; the average of the runs or the best of them, by dev, in `out_dir`;
    then (cfg.dpo_shrink) shrunk toward the base where dev says so (dpo_shrink.py)."""
    from .dpo_shrink import shrink_toward_base

    outcome, judge = _soup(cfg, out_dir)
    return shrink_toward_base(cfg, outcome, judge)


def _soup(cfg: TrainConfig, out_dir: Path) -> tuple[TrainOutcome, DevJudge | None]:
    started = time.time()
    first = fit(cfg, out_dir)
    if not wants_soup(cfg):
        return first, None
    members, durations = [first], [time.time() - started]
    try:
        t0 = time.time()
        judge = DevJudge(cfg)
        scores = [judge.score(first.model_dir)]
        eval_s = time.time() - t0  # an upper bound of one score: it includes the dev split's set-up
    except Exception as exc:  # noqa: BLE001 - no dev metric to choose by: the one run it is
        print(f"[soup] no dev metric ({type(exc).__name__}: {exc}); one run", flush=True)
        return first, None
    weight_bytes = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))

    def finish_s(runs: int) -> float:  # the next run's score, the average made and scored
        return 2 * eval_s + (runs + 1) * weight_bytes / COPY_BYTES_S + FINISH_SLACK_S

    while len(members) < cfg.soup_runs and \
            time.time() + MARGIN * max(durations) + finish_s(len(members) + 1) <= cfg.train_deadline:
        k, t0 = len(members), time.time()
        print(f"[soup] run {k + 1} of up to {cfg.soup_runs}: the last took {durations[-1]:.0f} s, "
              f"{cfg.train_deadline - t0:.0f} s are left", flush=True)
        try:
            member = fit(replace(cfg, run_name=f"{cfg.run_name}-order{k}", order_seed=cfg.order_seed + k),
                         soup_dir(cfg) / f"run{k}")
            score = judge.score(member.model_dir)
        except Exception as exc:  # noqa: BLE001 - an extra run never costs the runs already made
            print(f"[soup] run {k + 1} failed ({type(exc).__name__}: {exc}); no more runs", flush=True)
            break
        members.append(member)
        durations.append(time.time() - t0)
        scores.append(score)
    if len(members) == 1:
        return first, judge
    try:
        average = average_weights([m.model_dir for m in members], soup_dir(cfg) / "average")
        average_dev = judge.score(average)
    except Exception as exc:  # noqa: BLE001 - the runs' models stand: pick among them
        print(f"[soup] no average ({type(exc).__name__}: {exc})", flush=True)
        average, average_dev = None, math.inf
    best = min(range(len(members)), key=lambda i: scores[i])
    chosen = "average" if average_dev <= sum(scores) / len(scores) else f"run {best + 1}"
    print(f"[soup] dev: runs {', '.join(f'{s:.4f}' for s in scores)}, average {average_dev:.4f} -> {chosen}", flush=True)
    source = average if chosen == "average" else members[best].model_dir
    if source != out_dir:
        export_checkpoint(source, out_dir)
    # dev: each candidate evaluated here; run_dev: what each run's own loop measured on its dev split
    record = {"runs": len(members), "run_s": [round(d, 1) for d in durations], "dev": scores,
              "run_dev": [m.checkpoint_metrics.get("dev_loss") for m in members],
              "average_dev": average_dev if average is not None else None, "chosen": chosen}
    (Path(out_dir).parent / "soup.json").write_text(json.dumps(record, indent=2))
    metrics = {"dev_loss": average_dev, "weights": "soup"} if chosen == "average" else members[best].checkpoint_metrics
    return TrainOutcome(Path(out_dir), {**first.summary, "soup": record}, metrics,
                        [f for m in members for f in m.faults]), judge


def average_weights(dirs: list[Path], out: Path) -> Path:
    """The uniform average of the models in `dirs` (same architecture and files), tensor by
    tensor in fp32, saved in each tensor's own dtype; the other files from the first."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(dirs[0], out, ignore=shutil.ignore_patterns("*.safetensors"))
    for shard in sorted(Path(dirs[0]).glob("*.safetensors")):
        handles = [safe_open(str(Path(d) / shard.name), "pt") for d in dirs]
        averaged = {}
        for name in handles[0].keys():
            first = handles[0].get_tensor(name)
            total = sum((h.get_tensor(name).float() for h in handles[1:]), first.float())
            averaged[name] = (total / len(handles)).to(first.dtype)
        save_file(averaged, str(out / shard.name), metadata=handles[0].metadata())
    return out


class DevJudge:
    """The validator's metric of model folders on the run's own dev split (loop.setup's rows and
    split): Instruct/Chat the mean per-sample loss (+ kl_coef x KL to the base), DPO the mean pair
    loss against the base. On the first GPU when the run had GPUs (they are free between runs),
    else the CPU; the base stays on the CPU between scores."""

    def __init__(self, cfg: TrainConfig):
        from transformers import AutoConfig

        from .dev_split import split_dev
        from .dpo import DPO
        from .evaluate import fill_references
        from .formats import tokenize_task
        from .instruct import SFT
        from .modeling import load_submission, load_tokenizer

        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.recipe, self.kl_coef = (DPO if cfg.task_type == "DpoTask" else SFT), cfg.kl_coef
        tokenizer = load_tokenizer(cfg.model_path)
        self.pad_id = tokenizer.pad_token_id
        rows = json.loads(Path(cfg.train_file).read_text())
        examples = tokenize_task(cfg.task_type, rows, cfg.dataset_type, tokenizer,
                                 AutoConfig.from_pretrained(cfg.model_path), cfg.max_seq_len).examples
        _, self.dev = split_dev(examples, cfg.dev_fraction * self.recipe.dev_scale,
                                int(cfg.max_dev_rows * self.recipe.dev_scale), cfg.seed)
        if not self.dev:
            raise ValueError("the run has no dev split")
        self.base = load_submission(cfg.model_path) if self.recipe is DPO or (self.kl_coef and self.recipe is SFT) \
            else None
        if self.recipe is DPO:  # the reference log-probs, once, kept on the dev pairs
            self.base.to(self.device)
            fill_references(self.base, self.dev, self.pad_id)
            self.base = None

    @contextmanager
    def _loaded(self, folder: Path):
        from .modeling import load_submission

        model = load_submission(folder).to(self.device)
        try:
            yield model
        finally:
            del model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the next run's workers plan from free memory

    def losses(self, folder: Path) -> list[float]:
        """The validator's per-sample metric (without the KL term) of each dev example."""
        from .instruct import sample_losses

        with self._loaded(folder) as model:
            return sample_losses(model, self.dev, self.pad_id, self.device, BATCH_TOKENS, self.recipe)

    def score(self, folder: Path) -> float:
        from .evaluate import mean_kl_to_base
        from .instruct import dev_loss

        with self._loaded(folder) as model:
            score = float(dev_loss(model, self.dev, self.pad_id, self.device, BATCH_TOKENS, self.recipe))
            if self.base is not None:  # a KL-weighted task
                self.base.to(self.device)
                score += self.kl_coef * mean_kl_to_base(model, self.base, self.dev)
                self.base.to("cpu")
        return score
