"""The GRPO recipe: TRL's GRPOTrainer inside every Ray Train (TorchTrainer) worker.

Trains on what the validator scores (grpo_eval.py): raw-string prompts with the base tokenizer,
the task's reward functions with their weights (run in the sandbox, never in this process), the
validator's beta (0.5, KL to the base) and number of generations (2). The schedule and the
checkpoints follow the Instruct recipe: a few probe steps measure the step time, the plan is
capped to what fits before `train_deadline` and the warm-up + cosine schedule is stretched over
the steps that will really happen; at each save point the dev GRPO score (weighted reward -
beta x KL on held-out prompts) is measured and a checkpoint is reported to Ray Train, which keeps
the best one (it ranks on `dev_loss`, reported as -dev_score).
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, replace

import ray.train
import torch
from transformers import TrainerCallback

from .config import GrpoSettings, TrainConfig
from .deadline import PROBE_STEPS, DeadlinePlan, spread
from .decoding import cache_length, can_compile_decode, compile_decode, cudagraph_skips, first_decode
from .engines import PlainState
from .grpo_eval import BETA_GRPO, NUM_GENERATIONS, grpo_rows, grpo_score, reward_kwargs, reward_sources
from .instruct import lr_at
from .loop import report_checkpoint
from .master_weights import adamw
from .modeling import load_base_model, load_tokenizer, wrap_for_training
from .paths import TRAIN_STATE, RunPaths
from .reward_sandbox import RewardSandbox, SandboxLimits, check_reward_functions, usable_reward_problem

DEFAULTS = {"prompts_per_step": 16, "max_completion_length": 256, "dev_prompts": 32, "dev_max_completion": 256,
            "beta": BETA_GRPO, "num_generations": NUM_GENERATIONS, "compiled_decode": True}


# CPU workers only train tiny models against short budgets: shorter completions keep steps short.
CPU_DEFAULTS = {"max_completion_length": 32, "dev_max_completion": 32}

# fp32 master values of bf16 weights (full FT on a GPU) only within this share of the GPU: generation
# takes a third (cluster/planning/capacity.GRPO_GENERATION_SHARE) and two frozen bf16 references more.
# A quarter takes a 1.24 B model (Llama-3.2-1B: 14 bytes per parameter, 17.4 GB, on an 80 GB H100).
GRPO_MASTER_SHARE = 0.25

# Generation is compiled (decoding.py) only when at least this much of the training window is left:
# the compile takes 10-60 s at 0.5-1 B before the first step, more on larger models.
COMPILE_WINDOW_S = 600.0


def grpo_settings(cfg: TrainConfig, device_type: str = "cuda") -> GrpoSettings:
    """cfg.grpo with each unset knob at its default for the device (the planner may set any)."""
    defaults = {**DEFAULTS, **(CPU_DEFAULTS if device_type == "cpu" else {})}
    return replace(cfg.grpo, **{k: v for k, v in defaults.items() if getattr(cfg.grpo, k) is None})


def check_grpo_task(rows: list[dict], dataset_type: dict) -> None:
    """Plan-time check in the driver: rows with prompts, and at least one reward function that
    loads and passes the validator's smoke test on these rows. Raises DatasetError(reason)."""
    from .instruct_format import DatasetError

    adapted = grpo_rows(rows, dataset_type)
    if not adapted:
        raise DatasetError(f"no row has a non-empty prompt in column {dataset_type.get('field_prompt')!r}")
    _, weights = reward_sources(dataset_type)
    problem = usable_reward_problem(check_reward_functions(dataset_type, adapted[:10]), weights)
    if problem:
        raise DatasetError(problem)


def sandbox_rewards(box: RewardSandbox) -> tuple[list, list[int]]:
    """TRL reward callables, one per usable task function, proxying to the sandbox."""
    funcs, used = [], box.usable()
    for fn in used:
        def reward(completions, prompts=None, completion_ids=None, _fn=fn, **columns):
            rows = [{"prompt": p, **{k: v[i] for k, v in columns.items() if isinstance(v, list)}}
                    for i, p in enumerate(prompts or [""] * len(completions))]
            return box.call(_fn, list(completions), reward_kwargs(box, _fn, rows, completions))
        reward.__name__ = box.reports[fn].name
        funcs.append(reward)
    return funcs, used


def grpo_plan(cfg: TrainConfig, total: int, resume_step: int = 0) -> DeadlinePlan:
    """GRPO's schedule (deadline.py): the probe times the first steps from the trainer's start
    (no warm-up step left out), and a capped plan saves from the next step on."""
    return DeadlinePlan(total, cfg.saves, spread(total, cfg.saves, resume_step + 1), train_deadline=cfg.train_deadline,
                        resume_step=resume_step, warmup_steps=0)


class DeadlineAndCheckpoints(TrainerCallback):
    """Probes the step time, caps the plan at the deadline, evaluates and checkpoints."""

    def __init__(self, cfg: TrainConfig, plan: DeadlinePlan, evaluate, report, rank: int):
        self.cfg, self.plan, self.evaluate, self.report, self.rank = cfg, plan, evaluate, report, rank
        self.t0 = time.time()  # the history's elapsed_s; the probe's clock starts in on_train_begin
        self.history: list[dict] = []   # one entry per step, in the shape the job report plots
        self.dev_at: dict[int, dict] = {}
        self.best: dict = {"dev_score": None}

    def on_train_begin(self, args, state, control, **kwargs):
        # the probe times training steps, not what came before them (the decode step's compile: 46 s
        # cold at 0.5 B, against steps of about 1.5 s; in the probe it would plan ~7x too few steps)
        self.plan.start_clock(time.time())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:  # the trainer logs a step after on_step_end: attach its dev result
            step = self.plan.resume_step + state.global_step
            self.history.append({"step": step, "loss": logs.get("loss", 0.0), "lr": logs.get("learning_rate", 0.0),
                                 "reward": logs["reward"], "kl": logs.get("kl"),
                                 "elapsed_s": round(time.time() - self.t0, 2), **self.dev_at.pop(step, {})})

    def on_step_end(self, args, state, control, **kwargs):
        plan = self.plan
        step = plan.resume_step + state.global_step
        if plan.tick(step, time.time()):  # the probe's end, with a deadline
            plan.cap(step, plan.fits(time.time(), saves_left=0), this_step_saves=False)
            if self.rank == 0:
                print(f"[grpo] {plan.per_step:.2f}s/step; plan {plan.total} steps", flush=True)
        if self.cfg.early_save and state.global_step == plan.probe_end:
            plan.save_points.add(step)  # a complete model on disk minutes after the start
        done = step >= plan.total or plan.out_of_time(time.time())
        if step in plan.save_points or done:
            self.save(step)
        if done:
            control.should_training_stop = True
        return control

    def save(self, step: int) -> None:
        dev = self.evaluate()
        entry = {"step": step, **dev}
        if dev.get("dev_score") is not None and (self.best["dev_score"] is None
                                                  or dev["dev_score"] >= self.best["dev_score"]):
            self.best = {"dev_score": dev["dev_score"], "step": step}
        self.dev_at[step] = dev
        self.report(step, self.plan.total, entry)
        if self.rank == 0:
            print(f"[grpo] step {step}/{self.plan.total} dev {dev}", flush=True)


def train_loop_per_worker(config: dict) -> dict:
    cfg = TrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # cpu_threads=1 on a shared machine: spinning OpenMP threads starve
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, world)))
    torch.manual_seed(cfg.seed)
    run = setup(cfg, rank, world, device)
    try:
        return train(run)
    finally:
        run.box.close()


@dataclass
class GrpoRun:
    """What `setup` builds and `train` runs."""
    cfg: TrainConfig
    g: GrpoSettings              # cfg.grpo with the device's defaults filled in
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    model: torch.nn.Module
    reference: torch.nn.Module   # the KL reference of the dev score
    train: list[dict]
    dev: list[dict]
    box: RewardSandbox
    weights: list[float]


def start_sandbox(cfg: TrainConfig, g: GrpoSettings, sample_rows: list[dict]) -> tuple[RewardSandbox, list[float]]:
    """The task's reward functions started in their sandbox, and their weights; ValueError when none is usable."""
    sources, weights = reward_sources(cfg.dataset_type)
    box = RewardSandbox(sources, SandboxLimits(**g.sandbox), sample_rows=sample_rows)
    problem = usable_reward_problem(box.start(), weights)
    if problem:
        box.close()
        raise ValueError(problem)
    return box, weights


def setup(cfg: TrainConfig, rank: int, world: int, device) -> GrpoRun:
    """Model, prompts (dev split), and the reward functions started in their sandbox."""
    g = grpo_settings(cfg, device.type)
    tokenizer = load_tokenizer(cfg.model_path)
    base = load_base_model(cfg.model_path, device)
    with open(cfg.train_file) as f:
        rows = grpo_rows(json.load(f), cfg.dataset_type)
    random.Random(cfg.seed).shuffle(rows)
    n_dev = min(g.dev_prompts, int(len(rows) * cfg.dev_fraction)) if len(rows) >= 20 else 0
    dev, train = rows[:n_dev], rows[n_dev:]

    box, weights = start_sandbox(cfg, g, train[:10])
    model = wrap_for_training(base, cfg).to(device)
    # The KL reference for the dev score: the base itself (LoRA: adapter disabled; full: a frozen copy).
    reference = model if hasattr(model, "disable_adapter") else load_base_model(cfg.model_path, device).to(device).eval()
    return GrpoRun(cfg, g, rank, world, device, tokenizer, model, reference, train, dev, box, weights)


def train(run: GrpoRun) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cfg, g, device, model = run.cfg, run.g, run.device, run.model
    reward_funcs, used = sandbox_rewards(run.box)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(cfg, params, device, share=GRPO_MASTER_SHARE)
    checkpoints = PlainState(model, optimizer)  # what each save writes and a restart resumes from
    plan = resume(run, checkpoints)
    scheduler = grpo_scheduler(cfg, optimizer, plan)
    paths = RunPaths.of(cfg)
    callback = DeadlineAndCheckpoints(
        cfg, plan, lambda: dev_metrics(run),
        lambda step, total, m: report_checkpoint(checkpoints, run.tokenizer, step, total, m, run.rank, paths),
        run.rank)
    args = GRPOConfig(**grpo_args(cfg, g, device.type), output_dir=str(paths.rank_staging(run.rank)),
                      max_steps=plan.total - plan.resume_step, reward_weights=[run.weights[i] for i in used],
                      seed=cfg.seed + plan.resume_step)
    t0 = time.time()
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=Dataset.from_list(run.train),
                          processing_class=run.tokenizer, optimizers=(optimizer, scheduler), callbacks=[callback])
    compiled = fast_generation(trainer, g, run.tokenizer, [r["prompt"] for r in run.train], device, cfg.train_deadline)
    trainer.train()
    return {"history": callback.history, "steps": plan.resume_step + trainer.state.global_step,
            "planned_steps": plan.total, "best": callback.best, "train_rows": len(run.train), "dev_rows": len(run.dev),
            "reward_failures": run.box.failure_summary(), "train_seconds": round(time.time() - t0, 2),
            "decode": {"compiled": compiled, "cudagraph_skips": cudagraph_skips()}}


def grpo_args(cfg: TrainConfig, g: GrpoSettings, device_type: str) -> dict:
    """The recipe's GRPOConfig arguments but the run's own (output_dir, max_steps, reward_weights,
    seed); benchmarks/throughput_grpo.py times the same ones."""
    # One optimizer step = prompts_per_step prompts x num_generations completions per worker.
    return dict(beta=g.beta, num_generations=g.num_generations,
                per_device_train_batch_size=g.prompts_per_step * g.num_generations,
                gradient_accumulation_steps=cfg.grad_accum, max_completion_length=g.max_completion_length,
                temperature=1.0, learning_rate=cfg.lr, max_grad_norm=cfg.max_grad_norm, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=device_type == "cpu", bf16=device_type == "cuda",
                gradient_checkpointing=False, disable_tqdm=True)


def fast_generation(trainer, g: GrpoSettings, tokenizer, prompts: list[str], device, deadline: float = 0.0) -> bool:
    """The trainer's generation decodes under CUDA graphs from a static cache (decoding.py) where the
    device and the model allow it, g.compiled_decode is on and the deadline leaves time for the
    compile (COMPILE_WINDOW_S); whether it does."""
    if not g.compiled_decode or not can_compile_decode(trainer.model, device):
        return False
    if deadline and deadline - time.time() < COMPILE_WINDOW_S:
        return False  # the compile (up to minutes on large models) would eat most of what is left
    compile_decode(trainer.model, trainer.generation_config, cache_length(tokenizer, prompts, g.max_completion_length))
    batch = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation  # one generate call's
    return first_decode(trainer.model, tokenizer, prompts, batch, trainer.generation_config)


def grpo_scheduler(cfg: TrainConfig, optimizer, plan: DeadlinePlan):
    """Instruct's warm-up + cosine over the live plan; the warm-up ends by the probe at the latest,
    because a GRPO step is slow and the first plan (from epochs) is rarely the one that runs."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
        plan.resume_step + s, plan.total,
        replace(cfg, warmup_fraction=min(cfg.warmup_fraction, PROBE_STEPS / plan.total))) / cfg.lr)


def resume(run: GrpoRun, checkpoints: PlainState) -> DeadlinePlan:
    """The first plan (epochs of prompts), or after a restart the last reported weights, step and plan."""
    cfg = run.cfg
    steps_per_epoch = max(1, len(run.train) // (run.g.prompts_per_step * run.world * cfg.grad_accum))
    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return grpo_plan(cfg, max(1, int(cfg.epochs * steps_per_epoch)))
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, TRAIN_STATE), map_location=run.device, weights_only=False)
    checkpoints.resume(state)
    return grpo_plan(cfg, state["total"], resume_step=state["step"])


def dev_metrics(run: GrpoRun) -> dict:
    """The dev GRPO score (weighted reward - beta x KL on held-out prompts); Ray Train ranks
    checkpoints on dev_loss, reported as -dev_score."""
    if not run.dev:
        return {}
    s = grpo_score(run.model, run.tokenizer, run.dev, run.box, run.weights, base=run.reference,
                   max_new_tokens=run.g.dev_max_completion, seed=run.cfg.seed, beta=run.g.beta)
    return {"dev_score": s.score, "dev_loss": -s.score, "dev_reward": s.reward, "dev_kl": s.kl}
