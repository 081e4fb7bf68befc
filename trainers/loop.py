"""The training loop of the loss recipes (SFT: Instruct and Chat; DPO): runs inside every Ray
Train (TorchTrainer) worker, in three parts as in torchtune's recipes:

- `setup`: the config, the base model and tokenizer, the task's rows tokenised as the validator
  scores them, the dev split, the trainable model and its engine (DDP or ZeRO-3);
- `SftLoop.train`: epochs of micro-batches, an optimizer step every `grad_accum`, on a schedule
  the deadline planner (deadline.py) caps to the wall-clock budget; a dev evaluation with a
  checkpoint at each save point (`SftLoop.save`);
- `SftLoop.finish`: the optional pass over the dev rows (dev_pass.py) and the run's summary.

What differs between task types is the `Recipe` (instruct.py: the per-sample metric, a
preparation step); Instruct and Chat take the fast path of packing.py.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import ray.train
import torch
import torch.distributed as dist
from transformers import AutoConfig

from . import instruct
from .averaging import Selection
from .batching import split_dev
from .config import TrainConfig
from .deadline import DeadlinePlan, saves_within, spread
from .dev_pass import DevPass
from .engines import make_engine, zero3, zero3_loading, zero3_supported
from .formats import tokenize_task
from .instruct import Recipe, Steps, kl_reference, lr_at
from .layerwise import probe_ranks
from .modeling import load_base_model, load_tokenizer, wrap_for_training
from .oom import OomLadder
from .paths import CHECKPOINT_METRICS, TRAIN_STATE, RunPaths
from .progress import ProgressFile


def train_loop_per_worker(config: dict) -> dict:
    """Instruct and Chat: supervised fine-tuning on the validator's rendering."""
    return run_recipe(config, instruct.SFT)  # looked up now: tests swap the recipe


def run_recipe(config: dict, recipe: Recipe) -> dict:
    run = setup(TrainConfig(**config), recipe)
    loop = SftLoop(run, plan_steps(run))
    loop.train()
    return loop.finish()


@dataclass
class Setup:
    """What `setup` builds and the loop trains with."""
    cfg: TrainConfig
    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    steps: Steps                   # batching and the per-batch metric (fast path or the recipe's)
    engine: object                 # engines.py: forward module, backward, optimizer step, save, resume
    params: list                   # the trainable parameters
    shard: list                    # this rank's training examples
    dev: list
    data: dict                     # counts for the summary: rows, dropped_for_length, train, max_len

    def log(self, *args, **kwargs) -> None:
        if self.rank == 0:
            print(*args, flush=True, **kwargs)


def _start_loading(cfg: TrainConfig, device: torch.device) -> Future:
    """The base weights, loading in a thread (I/O and copies, mostly outside the GIL) while the
    caller reads and tokenises the rows: the two longest start-up steps overlap. On a GPU they go
    straight onto it. ZeRO-3 loads here, in this thread: its partitioning runs collectives."""
    if zero3(cfg):
        done: Future = Future()
        with zero3_loading(cfg, device):  # each rank holds 1/world of every weight from here on
            done.set_result(load_base_model(cfg.model_path, device))
        return done
    pool = ThreadPoolExecutor(1, thread_name_prefix="load-base")
    loading = pool.submit(load_base_model, cfg.model_path, device, True)
    pool.shutdown(wait=False)
    return loading


def setup(cfg: TrainConfig, recipe: Recipe) -> Setup:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # OMP_NUM_THREADS wins when set (shared CPUs: spinning extra threads under load is slow).
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // max(1, world)))
    torch.manual_seed(cfg.seed + cfg.order_seed)
    log = print if rank == 0 else lambda *_: None
    cfg = zero3_supported(cfg, recipe, log=log)

    tokenizer = load_tokenizer(cfg.model_path)
    loading = _start_loading(cfg, device)
    with open(cfg.train_file) as f:
        rows = json.load(f)
    # the validator's length for these rows (doubled when none fits the first), logged below
    data = tokenize_task(cfg.task_type, rows, cfg.dataset_type, tokenizer, AutoConfig.from_pretrained(cfg.model_path),
                         cfg.max_seq_len, log=log)
    base = loading.result()
    train, dev = split_dev(data.examples, cfg.dev_fraction * recipe.dev_scale,
                           int(cfg.max_dev_rows * recipe.dev_scale), cfg.seed)
    if not train:
        raise ValueError(f"no training rows: {len(rows)} rows, {data.dropped} too long for {data.max_len} tokens, "
                         f"{len(dev)} in the dev split")
    shard = train[rank::world]
    if recipe.prepare:
        base.to(device)
        shard = recipe.prepare(base, cfg, shard, dev, tokenizer.pad_token_id, device)
    ranks, probed = probe_ranks(base, recipe, cfg, shard, tokenizer.pad_token_id, device) \
        if cfg.method == "lora" and cfg.lora_layer_rank else (None, {})
    reference = kl_reference(base, cfg, device)
    model = wrap_for_training(base, cfg, ranks)
    model.to(device)
    steps = Steps(recipe, model, cfg, device, tokenizer.pad_token_id, max((len(ex) for ex in shard), default=1),
                  reference)
    params = [p for p in model.parameters() if p.requires_grad]
    # what the forward pass runs (the model or the fast path's loss module; DDP or ZeRO-3 over
    # the workers) and what turns its gradients into steps
    engine = make_engine(cfg, steps.module, model, params, device, world)
    counts = {"rows": len(rows), "dropped_for_length": data.dropped, "train_rows": len(train),
              "max_len": data.max_len, "layer_rank_probe": probed}
    return Setup(cfg, recipe, rank, world, device, tokenizer, steps, engine, params, shard, dev, counts)


def plan_steps(run: Setup) -> DeadlinePlan:
    """The first plan (epochs, capped by max_steps), continued from the last checkpoint after a
    restart."""
    cfg = run.cfg
    batches_per_epoch = len(run.steps.batches(run.shard, cfg.seed))
    total = max(1, int(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    n = run.data
    run.log(f"[train] rows={n['rows']} dropped_for_length={n['dropped_for_length']} train={n['train_rows']} "
            f"dev={len(run.dev)} max_len={n['max_len']} workers={run.world} planned_steps={total}")
    resume_step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # restarted after a failure: continue from the last reported weights
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, TRAIN_STATE), map_location=run.device, weights_only=False)
            resumed = run.engine.resume(state, d)
        if resumed:
            resume_step, total = state["step"], state["total"]
        else:
            run.log(f"[train] restarted: the step {state['step']} checkpoint lacks trainable weights, starting over "
                    f"from the base weights (that checkpoint stays a candidate)")
    return DeadlinePlan(total, cfg.saves, spread(total, cfg.saves), train_deadline=cfg.train_deadline,
                        resume_step=resume_step, warmup_steps=1)


class SftLoop:
    """The mutable state of one run of the loop: step counters, history, the best save so far."""

    def __init__(self, run: Setup, plan: DeadlinePlan):
        self.run, self.plan, self.cfg = run, plan, run.cfg
        cfg = run.cfg
        self.ladder = OomLadder(run.recipe.cut, log=print if run.rank == 0 else lambda *_: None, solo=run.world == 1)
        self.history: list[dict] = []
        self.progress = ProgressFile(cfg.progress_file if run.rank == 0 else "", world_size=run.world,
                                     device=run.device.type, train_deadline=cfg.train_deadline)
        self.paths = RunPaths.of(cfg)
        self.step, self.epoch, self.micro, self.t0, self.tokens = plan.resume_step, 0, 0, time.time(), 0
        self.best = {"dev_loss": None}
        self.selection = Selection(run.params, cfg)  # EMA / soup / rollback, when the config asks (averaging.py)
        self.dev_pass = DevPass(cfg, run.dev, run.steps.batches)  # the final pass over dev (dev_pass.py)
        self.step_s = 0.0  # the last step's time, until the probe measures a mean
        if cfg.keep_base and plan.resume_step == 0 and not cfg.search_trial:
            self.selection.remember_base(run.steps.dev_loss(run.dev))  # the bar the last checkpoint must clear
            plan.save_s = time.time() - self.t0  # a first measure of an evaluation's cost, for the first plan

    def micro_step(self, piece: list, weight: float) -> torch.Tensor:
        """Forward and backward of `weight` x the piece's mean loss; returns that mean loss, still
        on the device: reading it waits for the GPU, which the step leaves to its end."""
        loss = self.run.steps.mean_loss(self.run.engine.module, piece)
        self.run.engine.backward(loss * weight / self.cfg.grad_accum)
        return loss.detach()

    def train(self) -> None:
        run, cfg = self.run, self.cfg
        run.engine.module.train()
        done, t_prev = False, time.time()
        while not done:
            batches = run.steps.batches(run.shard, cfg.seed + cfg.order_seed + self.epoch)
            for i, batch in enumerate(batches):
                self.micro += 1
                if self.micro <= self.plan.resume_step * cfg.grad_accum:
                    continue  # already trained before the restart (batch order is deterministic)
                loss = self.ladder.run(batch, self.micro_step)
                if i + 1 < len(batches):  # the next batch's host work while the GPU runs this one
                    run.steps.prefetch(batches[i + 1])
                self.tokens += sum(len(ex) for ex in batch)
                if (i + 1) % cfg.grad_accum:
                    continue
                entry = self.optimizer_step(loss)
                # stop when one more step and the final dev evaluation and checkpoint would end past the
                # deadline (the step's time: the probe's mean, before it the last step's)
                self.step_s = self.plan.per_step or time.time() - t_prev
                out_of_time = self.plan.out_of_time(time.time(), self.step_s)
                done = _any_rank(self.step >= self.plan.total or out_of_time, run.device)
                if self.step % 10 == 0 or done:
                    run.log(f"[train] step {self.step}/{self.plan.total} loss {entry['loss']:.4f} "
                            f"lr {entry['lr']:.2e} {entry['tokens_per_s']:.0f} tok/s")
                if self.step in self.plan.save_points or done:
                    done = self.save(entry, done)
                self.progress.update(entry, self.plan.total, final=done)
                t_prev = time.time()
                if done:
                    break
            self.epoch += 1

    def optimizer_step(self, loss: torch.Tensor) -> dict:
        """One optimizer step; at the probe's end the plan is capped to the deadline."""
        run, cfg, plan = self.run, self.cfg, self.plan
        run.engine.step(lr_at(self.step, plan.total, cfg) * self.selection.lr_scale)
        loss = float(loss)  # the step's one wait for the GPU, after all of its work is queued
        self.selection.after_step(plan.total)
        self.step += 1
        now = time.time()
        if plan.tick(self.step, now):  # the probe's end, with a deadline
            plan.stop_at = cfg.train_deadline - self.dev_pass.reserve_s(plan.per_step, plan.save_s)
            plan.saves = saves_within(cfg.eval_share, plan.stop_at - now, plan.save_s, cfg.saves)
            self._cap(plan.fits(now, min(plan.saves, plan.saves_left(self.step))))
        if cfg.early_save and self.step - plan.resume_step == plan.probe_end:
            plan.save_points = plan.save_points | {self.step}  # a complete model on disk minutes after the start
        entry = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": run.engine.lr,
                 "elapsed_s": round(now - self.t0, 2),
                 "tokens_per_s": round(self.tokens * run.world / max(1e-6, now - self.t0), 1)}
        self.history.append(entry)
        return entry

    def save(self, entry: dict, done: bool) -> bool:
        """Dev evaluation and checkpoint; then the plan is re-measured. Returns `done`, which
        turns true when no step and final save fit any more (the checkpoint just reported is
        the last)."""
        run, cfg, plan, step = self.run, self.cfg, self.plan, self.step
        t_save = time.time()
        with self.selection.chosen(lambda: run.steps.dev_loss(run.dev), entry, step, final=done):
            if self.best["dev_loss"] is None or (entry["dev_loss"] or 0) <= self.best["dev_loss"]:
                self.best = {"dev_loss": entry["dev_loss"], "step": step}
            report_checkpoint(run.engine, run.tokenizer, step, plan.total, entry, run.rank, self.paths,
                              save=not cfg.search_trial)
            if done:
                self.dev_pass.keep(run.params, entry)
        plan.save_s = max(plan.save_s, time.time() - t_save - (self.selection.reserve_s if done else 0.0))
        plan.stop_at = (cfg.train_deadline - self.selection.reserve_s
                        - self.dev_pass.reserve_s(plan.per_step or self.step_s, plan.save_s)
                        if cfg.train_deadline else 0.0)
        if not done and self.selection.maybe_roll_back(entry):
            run.log(f"[train] dev metric worse {cfg.rollback_patience} times: back to step "
                    f"{entry['rollback_to']}, LR x{self.selection.lr_scale:g}")
        if cfg.train_deadline and not done and step - plan.resume_step >= plan.probe_end:
            plan.remeasure(step, t_save)
            self._cap(plan.fits(time.time(), plan.saves_left(step)))
            done = _any_rank(step >= plan.total, run.device)
        return done

    def _cap(self, fits: int) -> None:
        if self.plan.cap(self.step, fits, this_step_saves=True):
            self.run.log(f"[train] deadline caps the plan at {self.plan.total} steps ({self.plan.per_step:.2f}s/step)")

    def finish(self) -> dict:
        """The dev pass when it fits, then the run's summary (the driver's TrainOutcome.summary)."""
        run, cfg, plan = self.run, self.cfg, self.plan
        if self.dev_pass.start is not None and self.dev_pass.fits(time.time(), cfg.train_deadline,
                                                                  plan.per_step or self.step_s, plan.save_s):
            entry = self.dev_pass.run(lambda b, w: self.ladder.run(b, self.micro_step), run.engine, run.params,
                                      cfg.dev_pass_lr_ratio * cfg.lr * self.selection.lr_scale)
            self.step += entry["dev_pass_steps"]
            entry.update(step=self.step, dev_loss=run.steps.dev_loss(run.dev), elapsed_s=round(time.time() - self.t0, 2))
            self.history.append(entry)
            report_checkpoint(run.engine, run.tokenizer, self.step, plan.total, entry, run.rank, self.paths)
        d = run.data
        return {"history": self.history, "steps": self.step, "planned_steps": plan.total, "best": self.best,
                "dropped_for_length": d["dropped_for_length"], "train_rows": d["train_rows"], "dev_rows": len(run.dev),
                "max_len": d["max_len"], "tokens": self.tokens * run.world,
                "train_seconds": round(time.time() - self.t0, 2), "layer_rank_probe": d["layer_rank_probe"]}


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on one: all ranks must stop on the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def report_checkpoint(engine, tokenizer, step: int, total: int, metrics: dict, rank: int, paths: RunPaths,
                      save: bool = True) -> None:
    """Reports metrics with a checkpoint that `engine.save` writes (engines.py: rank 0 writes it;
    every rank must call report and, under ZeRO-3, take part in gathering the weights).
    Ray Train copies the checkpoint into the run's storage during report, so the staging copy
    is removed afterwards - except in local mode (num_workers=0, no Ray), where it is the copy.
    Search trials (save=False) report metrics only: their weights are never used."""
    d = str(paths.step_dir(rank, step))
    checkpoint = None
    if save:
        engine.save(tokenizer, d, {"step": step, "total": total}, write=rank == 0)
    if rank == 0 and save:
        with open(os.path.join(d, CHECKPOINT_METRICS), "w") as f:  # lets the watchdog pick the best one
            json.dump(metrics, f)
        checkpoint = ray.train.Checkpoint.from_directory(d)
    ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
    if rank == 0 and ray.is_initialized():
        shutil.rmtree(d, ignore_errors=True)
