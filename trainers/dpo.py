"""The DPO recipe: sigmoid DPO at the validator's beta on its raw-string pairs (dpo_format.py),
in the shared training loop (instruct.run_recipe: deadline schedule, dev metric, checkpoints).

The reference is the base model, never held as a second copy: its log-probs are computed once
per pair and kept on the example. With LoRA they are computed when a pair is first used, by
the same weights with the adapter switched off (so nothing is spent on pairs the deadline
never reaches); a full fine-tune computes them for all its pairs before the first step.
The dev metric is the validator's DPO loss against the same reference.
"""
from __future__ import annotations

import torch

from .batching import make_batches
from .config import TrainConfig
from .dpo_format import PairExample, dpo_loss, sequence_logps
from .instruct import Recipe, run_recipe


@torch.no_grad()
def fill_reference(model, examples: list[PairExample], pad_id: int, device) -> None:
    """Stores the model's (chosen, rejected) log-probs on each example, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    logps = sequence_logps(model, examples, pad_id, device)
    for ex, c, r in zip(examples, logps[0].tolist(), logps[1].tolist()):
        ex.ref = (c, r)
    model.train(was_training)


def ensure_reference(model, batch: list[PairExample], pad_id: int, device) -> None:
    missing = [ex for ex in batch if ex.ref is None]
    if not missing:
        return
    core = getattr(model, "module", model)  # under DDP
    if not hasattr(core, "disable_adapter"):
        raise RuntimeError("full fine-tuning needs the reference log-probs before training (prepare)")
    with core.disable_adapter():
        fill_reference(core, missing, pad_id, device)


def dpo_per_sample(model, batch: list[PairExample], pad_id: int, device) -> torch.Tensor:
    ensure_reference(model, batch, pad_id, device)
    policy = sequence_logps(model, batch, pad_id, device)
    reference = torch.tensor([ex.ref for ex in batch], dtype=torch.float32, device=device).T
    return dpo_loss(policy, reference)


def precompute_for_full(base, cfg: TrainConfig, examples: list[PairExample], pad_id: int, device) -> None:
    if cfg.method == "lora":
        return  # computed lazily through the disabled adapter
    for batch in make_batches(examples, cfg.batch_tokens, cfg.max_batch, seed=0):
        fill_reference(base, batch, pad_id, device)


DPO = Recipe(per_sample=dpo_per_sample, prepare=precompute_for_full)


def train_loop_per_worker(config: dict) -> dict:
    return run_recipe(config, DPO)
