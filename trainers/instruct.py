"""The training loop of every recipe: runs inside every Ray Train (TorchTrainer) worker.

Trains on exactly the text the validator scores (see formats.py) with a per-sample loss equal
to its metric, on a schedule planned from the wall-clock budget: after a few probe steps the
total step count is capped so that training ends by `train_deadline`, and the cosine schedule
is stretched over the steps that will really happen; the time each dev evaluation and
checkpoint takes is measured and kept back too. A `Recipe` holds what differs between task
types (the per-sample metric, a preparation step); Instruct and Chat are the SFT recipe (only
the rendering differs) and take the fast path of packing.py (packed varlen batches and a fused
label-only cross-entropy on GPU); DPO is in dpo.py.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import ray.train
import torch
import torch.distributed as dist

from .averaging import DevMetric, Selection
from .batching import collate, make_batches, per_sample_loss, split_dev
from .config import TrainConfig
from .dev_pass import DevPass
from .engines import make_engine, zero3_loading, zero3_supported
from .formats import tokenize_task
from .instruct_format import Example
from .layerwise import probe_ranks
from .modeling import load_base_model, load_tokenizer, wrap_for_training
from .oom import OomLadder
from .packing import fast_path
from .progress import ProgressFile

PROBE_STEPS = 5


@dataclass(frozen=True)
class Recipe:
    # (model, batch, pad_id, device) -> tensor [len(batch)]: the validator's metric per sample
    per_sample: Callable
    # (base_model, cfg, train shard, dev, pad_id, device) -> the shard to train on: before the
    # trainable part is attached
    prepare: Callable | None = None
    # (example, length) -> the example cut to `length` tokens, for the OOM ladder (None: cannot cut)
    cut: Callable | None = None
    # the per-token cross-entropy of SFT: packing.fast_path computes it packed and fused
    fast: bool = False
    # x the dev split's fraction and row cap (a noisier per-sample metric needs more rows)
    dev_scale: float = 1.0


def sft_per_sample(model, batch, pad_id: int, device) -> torch.Tensor:
    inputs = collate(batch, pad_id, device)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return per_sample_loss(logits, inputs["labels"])


def cut_example(ex: Example, length: int) -> Example:
    return Example(ex.input_ids[:length], ex.labels[:length])


SFT = Recipe(per_sample=sft_per_sample, cut=cut_example, fast=True)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(total * cfg.warmup_fraction))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on one: all ranks must stop on the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def sample_losses(model, examples: list, pad_id: int, device, batch_tokens: int, recipe: Recipe = SFT) -> list[float]:
    """The recipe's validator metric of each example, padded, in the order of `examples` (batched
    by length): the per-example vector the tournaments' paired rule compares between two models."""
    model.eval()
    where = {id(ex): i for i, ex in enumerate(examples)}  # make_batches reorders (by length, shuffled)
    losses = [math.nan] * len(examples)
    for batch in make_batches(examples, batch_tokens, 16, seed=0):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for ex, loss in zip(batch, recipe.per_sample(model, batch, pad_id, device).tolist()):
                losses[where[id(ex)]] = loss
    model.train()
    return losses


def dev_loss(model, dev, pad_id: int, device, batch_tokens: int, recipe: Recipe = SFT) -> float | None:
    """The recipe's validator metric on `dev`: the mean of sample_losses (also the evaluator's)."""
    if not dev:
        return None
    return DevMetric([(loss, 1) for loss in sample_losses(model, dev, pad_id, device, batch_tokens, recipe)])


class Steps:
    """How one recipe turns examples into micro-batches and a batch into its mean metric:
    the fast path (packing.py) for SFT, the recipe's own per-sample metric otherwise."""

    def __init__(self, recipe: Recipe, model, cfg: TrainConfig, device, pad_id: int, longest: int, reference=None):
        self.recipe, self.cfg, self.device, self.pad_id = recipe, cfg, device, pad_id
        self.plan = None
        self.module = model
        if recipe.fast:
            self.module, self.plan = fast_path(model, cfg, device, longest, reference)

    def batches(self, examples: list, seed: int) -> list[list]:
        if self.plan is not None:
            return self.plan.batches(examples, seed)
        return make_batches(examples, self.cfg.batch_tokens, self.cfg.max_batch, seed)

    def mean_loss(self, module, batch: list) -> torch.Tensor:
        """Mean over the batch's samples of the validator's per-sample metric."""
        if self.plan is not None:
            return module(**self.plan.collate(batch, self.pad_id, self.device))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.recipe.per_sample(module, batch, self.pad_id, self.device).mean()

    @torch.no_grad()
    def dev_loss(self, dev: list) -> float | None:
        """The validator's metric on the dev split (mean over samples)."""
        if self.plan is None:
            return dev_loss(self.module, dev, self.pad_id, self.device, self.cfg.batch_tokens, self.recipe)
        if not dev:
            return None
        self.module.eval()  # per micro-batch means (packed: no per-sample values without a cost)
        groups, kl_sum, kl_count = [], 0.0, 0
        for b in self.batches(dev, seed=0):
            ce, kl, count = self.module(return_terms=True, **self.plan.collate(b, self.pad_id, self.device))
            groups.append((float(ce) * len(b), len(b)))
            kl_sum, kl_count = kl_sum + float(kl), kl_count + count
        self.module.train()
        if kl_count:  # the validator's KL is one token-weighted mean over the set: spread it over the groups
            groups = [(s + self.cfg.kl_coef * kl_sum / kl_count * c, c) for s, c in groups]
        return DevMetric(groups)


def steps_that_fit(now: float, deadline: float, per_step: float, saves_left: int, save_s: float) -> int:
    """Optimizer steps that still fit before `deadline`, keeping back the remaining dev
    evaluations and checkpoints at their measured cost, with a 10% margin."""
    return int(max(0.0, deadline - now - saves_left * save_s) / max(per_step, 1e-6) * 0.9)


def saves_within(share: float, window_s: float, save_s: float, saves: int) -> int:
    """The dev evaluations (with their checkpoints) that fit in `share` of the training window
    at their measured cost, between 2 and `saves` (share 0: `saves`). When the deadline binds,
    every evaluation is optimizer steps not taken; on short runs the dev metric falls at every
    save and only the last ones can be chosen. Two at least: a checkpoint half-way, so that a
    crash late in the run resumes from it instead of the start, and the final one."""
    if share <= 0 or save_s <= 0:
        return saves
    return max(min(2, saves), min(saves, int(share * window_s / save_s)))


def kl_reference(base, cfg: TrainConfig, device):
    """The frozen starting weights a full fine-tune's KL term compares with (None: not needed,
    a LoRA run switches its adapter off instead)."""
    if not cfg.kl_coef or cfg.method == "lora":
        return None
    import copy

    reference = copy.deepcopy(base).to(device).eval()
    reference.requires_grad_(False)
    return reference


def train_loop_per_worker(config: dict) -> dict:
    """Instruct and Chat: supervised fine-tuning on the validator's rendering."""
    return run_recipe(config, SFT)


def run_recipe(config: dict, recipe: Recipe) -> dict:
    cfg = TrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # OMP_NUM_THREADS wins when set (shared CPUs: spinning extra threads under load is slow).
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // max(1, world)))
    torch.manual_seed(cfg.seed)
    cfg = zero3_supported(cfg, recipe, log=print if rank == 0 else lambda *_: None)

    tokenizer = load_tokenizer(cfg.model_path)
    with zero3_loading(cfg, device):  # ZeRO-3: each rank holds 1/world of every weight from here on
        base = load_base_model(cfg.model_path, device)
    with open(cfg.train_file) as f:
        rows = json.load(f)
    # the validator's length for these rows (doubled when none fits the first), logged below
    data = tokenize_task(cfg.task_type, rows, cfg.dataset_type, tokenizer, base.config, cfg.max_seq_len,
                         log=print if rank == 0 else lambda *_: None)
    examples, dropped, max_len = data.examples, data.dropped, data.max_len
    train, dev = split_dev(examples, cfg.dev_fraction * recipe.dev_scale, int(cfg.max_dev_rows * recipe.dev_scale),
                           cfg.seed)
    shard = train[rank::world]
    if recipe.prepare:
        base.to(device)
        shard = recipe.prepare(base, cfg, shard, dev, tokenizer.pad_token_id, device)
    ranks, probed = probe_ranks(base, recipe, cfg, shard, tokenizer.pad_token_id, device) \
        if cfg.method == "lora" and cfg.lora_layer_rank else (None, {})
    reference = kl_reference(base, cfg, device)
    model = wrap_for_training(base, cfg, ranks)
    model.to(device)
    raw_model = model
    steps = Steps(recipe, model, cfg, device, tokenizer.pad_token_id, max((len(ex) for ex in shard), default=1),
                  reference)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    # what the forward pass runs (the model or the fast path's loss module; DDP or ZeRO-3 over
    # the workers) and what turns its gradients into steps
    engine = make_engine(cfg, steps.module, raw_model, params, device, world)
    trained = engine.module

    batches_per_epoch = len(steps.batches(shard, cfg.seed))
    total = max(1, int(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    if rank == 0:
        print(f"[train] rows={len(rows)} dropped_for_length={dropped} train={len(train)} dev={len(dev)} "
              f"max_len={max_len} workers={world} planned_steps={total}", flush=True)

    resume_step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # restarted after a failure: continue from the last reported weights
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "train_state.pt"), map_location=device, weights_only=False)
            resumed = engine.resume(state, d)
        if resumed:
            resume_step, total = state["step"], state["total"]
        elif rank == 0:
            print(f"[train] restarted: the step {state['step']} checkpoint lacks trainable weights, starting over "
                  f"from the base weights (that checkpoint stays a candidate)", flush=True)

    def micro_step(piece: list, weight: float) -> float:
        """Forward and backward of `weight` x the piece's mean loss; returns that mean loss."""
        loss = steps.mean_loss(trained, piece)
        engine.backward(loss * weight / cfg.grad_accum)
        return loss.item()

    ladder = OomLadder(recipe.cut, log=print if rank == 0 else lambda *_: None, solo=world == 1)
    history: list[dict] = []
    progress = ProgressFile(cfg.progress_file if rank == 0 else "", world_size=world, device=device.type,
                            train_deadline=cfg.train_deadline)
    staging = os.path.join(cfg.run_dir, cfg.run_name, "_staging", f"rank{rank}")
    save_points = {int(total * (i + 1) / cfg.saves) for i in range(cfg.saves)}
    step, epoch, micro, t0, tokens = resume_step, 0, 0, time.time(), 0
    best = {"dev_loss": None}
    save_s = 0.0  # what one dev evaluation + checkpoint costs, measured at each save
    selection = Selection(params, cfg)  # EMA / soup / rollback, when the config asks (averaging.py)
    dev_pass, per_step = DevPass(cfg, dev, steps.batches), 0.0  # the final pass over dev (dev_pass.py)
    if cfg.keep_base and resume_step == 0 and not cfg.search_trial:
        selection.remember_base(steps.dev_loss(dev))  # the bar the last checkpoint must clear
        save_s = time.time() - t0  # a first measure of an evaluation's cost, for the first plan
    saves = cfg.saves
    deadline = cfg.train_deadline
    trained.train()
    done, t_prev = False, time.time()
    while not done:
        for i, batch in enumerate(steps.batches(shard, cfg.seed + epoch)):
            micro += 1
            if micro <= resume_step * cfg.grad_accum:
                continue  # already trained before the restart (batch order is deterministic)
            loss = ladder.run(batch, micro_step)
            tokens += sum(len(ex) for ex in batch)
            if (i + 1) % cfg.grad_accum:
                continue
            engine.step(lr_at(step, total, cfg) * selection.lr_scale)
            selection.after_step(total)
            step += 1
            if step - resume_step == 1:
                t_warm = time.time()  # the first step carries torch.compile's warm-up: not a probe
            if step - resume_step == PROBE_STEPS + 1 and cfg.train_deadline:
                per_step = (time.time() - t_warm) / PROBE_STEPS
                deadline = cfg.train_deadline - dev_pass.reserve_s(per_step, save_s)
                saves = saves_within(cfg.eval_share, deadline - time.time(), save_s, cfg.saves)
                total, save_points = _cap(step, total, save_points, steps_that_fit(
                    time.time(), deadline, per_step, min(saves, len([p for p in save_points if p > step])), save_s),
                    saves, per_step, rank)
            if cfg.early_save and step - resume_step == PROBE_STEPS + 1:
                save_points = save_points | {step}  # a complete model on disk minutes after the start
            entry = {"step": step, "epoch": epoch, "loss": loss,
                     "lr": engine.lr, "elapsed_s": round(time.time() - t0, 2),
                     "tokens_per_s": round(tokens * world / max(1e-6, time.time() - t0), 1)}
            history.append(entry)
            # stop when one more step and the final dev evaluation and checkpoint would end past the
            # deadline (the step's time: the probe's mean, before it the last step's)
            step_s = per_step or time.time() - t_prev
            out_of_time = bool(deadline) and time.time() + save_s + step_s >= deadline
            done = _any_rank(step >= total or out_of_time, device)
            if rank == 0 and (step % 10 == 0 or done):
                print(f"[train] step {step}/{total} loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
                      f"{entry['tokens_per_s']:.0f} tok/s", flush=True)
            if step in save_points or done:
                t_save = time.time()
                with selection.chosen(lambda: steps.dev_loss(dev), entry, step, final=done):
                    if best["dev_loss"] is None or (entry["dev_loss"] or 0) <= best["dev_loss"]:
                        best = {"dev_loss": entry["dev_loss"], "step": step}
                    _report(engine, tokenizer, step, total, entry, rank, staging,
                            save=not cfg.search_trial)
                    if done:
                        dev_pass.keep(params, entry)
                save_s = max(save_s, time.time() - t_save - (selection.reserve_s if done else 0.0))
                deadline = (cfg.train_deadline - selection.reserve_s - dev_pass.reserve_s(per_step or step_s, save_s)
                            if cfg.train_deadline else 0.0)
                if not done and selection.maybe_roll_back(entry) and rank == 0:
                    print(f"[train] dev metric worse {cfg.rollback_patience} times: back to step "
                          f"{entry['rollback_to']}, LR x{selection.lr_scale:g}", flush=True)
                if cfg.train_deadline and not done and step - resume_step > PROBE_STEPS:
                    per_step = (t_save - t_warm) / max(1, step - resume_step - 1)
                    left = len([p for p in save_points if p > step])
                    total, save_points = _cap(step, total, save_points, steps_that_fit(
                        time.time(), deadline, per_step, left, save_s), saves, per_step, rank)
                    # no step and final save fit any more: the checkpoint just reported is the last
                    done = _any_rank(step >= total, device)
            progress.update(entry, total, final=done)
            t_prev = time.time()
            if done:
                break
        epoch += 1
    if dev_pass.start is not None and dev_pass.fits(time.time(), cfg.train_deadline, per_step or step_s, save_s):
        entry = dev_pass.run(lambda b, w: ladder.run(b, micro_step), engine, params,
                             cfg.dev_pass_lr_ratio * cfg.lr * selection.lr_scale)
        step += entry["dev_pass_steps"]
        entry.update(step=step, dev_loss=steps.dev_loss(dev), elapsed_s=round(time.time() - t0, 2))
        history.append(entry)
        _report(engine, tokenizer, step, total, entry, rank, staging)
    return {"history": history, "steps": step, "planned_steps": total, "best": best,
            "dropped_for_length": dropped, "train_rows": len(train), "dev_rows": len(dev),
            "max_len": max_len, "tokens": tokens * world, "train_seconds": round(time.time() - t0, 2),
            "layer_rank_probe": probed}


def _cap(step: int, total: int, save_points: set, fits: int, saves: int, per_step: float, rank: int):
    """The plan capped to `fits` more steps, save points spread over what remains."""
    if step + fits >= total:
        return total, save_points
    total = max(step, step + fits)
    save_points = {p for p in save_points if p <= step} | {max(step, int(total * (k + 1) / saves)) for k in range(saves)}
    if rank == 0:
        print(f"[train] deadline caps the plan at {total} steps ({per_step:.2f}s/step)", flush=True)
    return total, save_points


def _report(engine, tokenizer, step: int, total: int, metrics: dict, rank: int, staging: str,
            save: bool = True) -> None:
    """Reports metrics with a checkpoint that `engine.save` writes (engines.py: rank 0 writes it;
    every rank must call report and, under ZeRO-3, take part in gathering the weights).
    Ray Train copies the checkpoint into the run's storage during report, so the staging copy
    is removed afterwards - except in local mode (num_workers=0, no Ray), where it is the copy.
    Search trials (save=False) report metrics only: their weights are never used."""
    d = os.path.join(staging, f"step_{step:07d}")
    checkpoint = None
    if save:
        engine.save(tokenizer, d, {"step": step, "total": total}, write=rank == 0)
    if rank == 0 and save:
        with open(os.path.join(d, "metrics.json"), "w") as f:  # lets the watchdog pick the best one
            json.dump(metrics, f)
        checkpoint = ray.train.Checkpoint.from_directory(d)
    ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
    if rank == 0 and ray.is_initialized():
        shutil.rmtree(d, ignore_errors=True)
