"""The final pass over the dev rows (training-recipes.md §1.6 "Dev pass"; TrainConfig.dev_pass).

Once the weights to publish are chosen on the dev split, the dev rows have done their job; the
validator scores a separate test set, so they are worth training on as fresh data. One epoch
over them at `lr x dev_pass_lr_ratio` (constant, below the cosine's start) continues from the
chosen weights with the optimizer's state; its time is kept back from the main loop's deadline
at the measured step time. The pass is skipped when the chosen weights are the base model's
(training only added noise on dev: more of it at a low LR would not help) and in search trials.
Its checkpoint reports the dev metric measured after the pass (optimistic: it has seen those
rows) beside the one it started from, so a pass that made even its own data worse loses the
checkpoint selection to the weights it started from.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .averaging import cpu_copy, load

MARGIN = 1.2  # the pass's steps at the measured step time, +20%


class DevPass:
    def __init__(self, cfg, dev: list, batches: Callable[[list, int], list]):
        self.cfg = cfg
        self.enabled = bool(cfg.dev_pass and dev and not cfg.search_trial)
        self.batches = batches(dev, cfg.seed + 1) if self.enabled else []
        self.start: list[torch.Tensor] | None = None  # the chosen weights, once the main loop ends
        self.start_metric: float | None = None

    def reserve_s(self, per_step: float, save_s: float) -> float:
        """Seconds the main loop keeps back: the pass's optimizer steps and one more checkpoint."""
        if not self.enabled:
            return 0.0
        return math.ceil(len(self.batches) / self.cfg.grad_accum) * per_step * MARGIN + save_s

    def fits(self, now: float, deadline: float, per_step: float, save_s: float) -> bool:
        """Whether the pass and its checkpoint end by `deadline` (0: none); a pass that would
        not is skipped: the chosen weights are already checkpointed."""
        return not deadline or now + self.reserve_s(per_step, save_s) <= deadline

    def keep(self, params: list[torch.nn.Parameter], entry: dict) -> None:
        """Called with the final checkpoint's weights in the model: the pass starts from them."""
        if self.enabled and entry.get("weights") != "base":
            self.start, self.start_metric = cpu_copy(params), entry.get("dev_loss")

    def run(self, step_fn: Callable[[list, float], object], engine, params: list[torch.nn.Parameter],
            lr: float) -> dict:
        """One epoch over the dev batches from the kept weights; `step_fn(batch, weight)` is the
        loop's forward + backward, `engine.step(lr)` its optimizer step (engines.py). Returns the
        history entry of the pass (dev metric not yet set)."""
        load(params, self.start)
        losses, steps = [], 0
        for i, batch in enumerate(self.batches):
            losses.append(step_fn(batch, 1.0))
            if (i + 1) % self.cfg.grad_accum and i + 1 < len(self.batches):
                continue
            engine.step(lr)
            steps += 1
        return {"dev_pass_steps": steps, "loss": float(sum(losses)) / max(1, len(losses)), "lr": lr,
                "dev_loss_before_pass": self.start_metric, "weights": "dev pass"}
