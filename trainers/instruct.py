"""The SFT recipe (Instruct and Chat) and what every loss recipe shares.

Trains on exactly the text the validator scores (see formats.py) with a per-sample loss equal
to its metric. A `Recipe` holds what differs between task types (the per-sample metric, a
preparation step); Instruct and Chat are the SFT recipe (only the rendering differs) and take
the fast path of packing.py (packed varlen batches and a fused label-only cross-entropy on
GPU); DPO is in dpo.py. The loop that trains a recipe, on a schedule planned from the
wall-clock budget (deadline.py), is loop.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .averaging import DevMetric
from .batching import collate, make_batches, per_sample_loss
from .config import TrainConfig
from .instruct_format import Example
from .packing import fast_path


@dataclass(frozen=True)
class Recipe:
    # (model, batch, pad_id, device) -> tensor [len(batch)]: the validator's metric per sample
    per_sample: Callable
    # (base_model, cfg, train shard, dev, pad_id, device) -> the shard to train on: before the
    # trainable part is attached
    prepare: Callable | None = None
    # (example, length) -> the example cut to `length` tokens, for the OOM ladder (None: cannot cut)
    cut: Callable | None = None
    # (model, cfg, device, longest, reference) -> (loss module, StepPlan): the recipe's packed and
    # fused step (packing.fast_path for SFT, dpo_packed.pair_fast_path for DPO); None: per_sample
    fast: Callable | None = None
    # x the dev split's fraction and row cap (a noisier per-sample metric needs more rows)
    dev_scale: float = 1.0


def sft_per_sample(model, batch, pad_id: int, device) -> torch.Tensor:
    inputs = collate(batch, pad_id, device)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return per_sample_loss(logits, inputs["labels"])


def cut_example(ex: Example, length: int) -> Example:
    return Example(ex.input_ids[:length], ex.labels[:length])


SFT = Recipe(per_sample=sft_per_sample, cut=cut_example, fast=fast_path)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(total * cfg.warmup_fraction))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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
    the recipe's fast path (packing.py, dpo_packed.py) or its own per-sample metric."""

    def __init__(self, recipe: Recipe, model, cfg: TrainConfig, device, pad_id: int, longest: int, reference=None):
        self.recipe, self.cfg, self.device, self.pad_id = recipe, cfg, device, pad_id
        self.plan = None
        self.module = model
        self._ahead: tuple[list, dict] | None = None  # a batch collated before its turn (prefetch)
        if recipe.fast:
            self.module, self.plan = recipe.fast(model, cfg, device, longest, reference)

    def batches(self, examples: list, seed: int) -> list[list]:
        if self.plan is not None:
            return self.plan.batches(examples, seed)
        return make_batches(examples, self.cfg.batch_tokens, self.cfg.max_batch, seed)

    def prefetch(self, batch: list) -> None:
        """Collates `batch` now (host work and an asynchronous copy) while the GPU is still busy
        with the previous one; mean_loss uses it when that very batch comes."""
        if self.plan is not None:
            self._ahead = (batch, self.plan.collate(batch, self.pad_id, self.device))

    def mean_loss(self, module, batch: list) -> torch.Tensor:
        """Mean over the batch's samples of the validator's per-sample metric."""
        if self.plan is not None:
            ahead, self._ahead = self._ahead, None
            collated = ahead[1] if ahead and ahead[0] is batch else self.plan.collate(batch, self.pad_id, self.device)
            return module(**collated)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.recipe.per_sample(module, batch, self.pad_id, self.device).mean()

    @torch.no_grad()
    def dev_loss(self, dev: list) -> float | None:
        """The validator's metric on the dev split (mean over samples)."""
        if self.plan is None:
            return dev_loss(self.module, dev, self.pad_id, self.device, self.cfg.batch_tokens, self.recipe)
        if not dev:
            return None
        self.module.eval()
        if getattr(self.module, "sample_losses", False):  # DPO: per-pair losses, as the unfused metric's
            losses = [loss for b in self.batches(dev, seed=0)
                      for loss in self.module(return_losses=True, **self.plan.collate(b, self.pad_id, self.device)).tolist()]
            self.module.train()
            return DevMetric([(loss, 1) for loss in losses])
        # SFT: per micro-batch means (packed: no per-sample values without a cost)
        groups, kl_sum, kl_count = [], 0.0, 0
        for b in self.batches(dev, seed=0):
            ce, kl, count = self.module(return_terms=True, **self.plan.collate(b, self.pad_id, self.device))
            groups.append((float(ce) * len(b), len(b)))
            kl_sum, kl_count = kl_sum + float(kl), kl_count + count
        self.module.train()
        if kl_count:  # the validator's KL is one token-weighted mean over the set: spread it over the groups
            groups = [(s + self.cfg.kl_coef * kl_sum / kl_count * c, c) for s, c in groups]
        return DevMetric(groups)


def kl_reference(base, cfg: TrainConfig, device):
    """The frozen starting weights a full fine-tune's KL term compares with (None: not needed,
    a LoRA run switches its adapter off instead)."""
    if not cfg.kl_coef or cfg.method == "lora":
        return None
    import copy

    reference = copy.deepcopy(base).to(device).eval()
    reference.requires_grad_(False)
    return reference
