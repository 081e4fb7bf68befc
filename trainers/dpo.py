"""The DPO recipe: sigmoid DPO at the validator's beta on its raw-string pairs, tokenised, cut
and summed as its per-pair loss is (dpo_format.py: prompt + completion tokenised together, up to
the model's max_position_embeddings), in the shared training loop (loop.run_recipe: deadline
schedule, dev metric, checkpoints). Training and the dev metric run on the fast path of
dpo_packed.py (pairs packed padding-free on a GPU, the head fused with the loss); `dpo_per_sample`
is the plain per-pair computation (a padded batch, full logits) that evaluation and tests use.
A long pair is a micro-batch of its own (batches never split one); one that still runs out of
memory is cut by the OOM ladder (dpo_format.cut_pair) and its reference recomputed on what is
left - with LoRA only: a full fine-tune keeps no base copy.

The reference is the base model, never held as a second copy: its log-probs are computed once
per pair and kept on the example. With LoRA they are computed when a pair is first used, by
the same weights with the adapter switched off (so nothing is spent on pairs the deadline
never reaches); a full fine-tune computes them before the first step, for the dev pairs and for
as many training pairs as the deadline lets it train (`precompute_for_full`).
The dev metric is the validator's DPO loss against the same reference, on a 4x larger dev split
than SFT's (a per-pair difference of log-prob differences is noisy; a dev pair costs one forward
pass of two sequences): what the paired base-vs-trained test (averaging.clearly_better) needs.
"""
from __future__ import annotations

import time

import torch

from .config import TrainConfig
from .dpo_format import PairExample, cut_pair, dpo_loss, sequence_logps
from .dpo_packed import NO_BASE_COPY, pair_fast_path
from .instruct import Recipe
from .loop import run_recipe


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
        raise RuntimeError(NO_BASE_COPY)
    with core.disable_adapter():
        fill_reference(core, missing, pad_id, device)


def dpo_per_sample(model, batch: list[PairExample], pad_id: int, device) -> torch.Tensor:
    ensure_reference(model, batch, pad_id, device)
    policy = sequence_logps(model, batch, pad_id, device)
    reference = torch.tensor([ex.ref for ex in batch], dtype=torch.float32, device=device).T
    return dpo_loss(policy, reference)


# A pair's reference forward costs about a third of its training step (forward + backward): with
# this share of the time to the deadline spent on references, the rest trains about one epoch
# of the pairs that have them.
REFERENCE_SHARE = 0.25


def precompute_for_full(base, cfg: TrainConfig, train: list[PairExample], dev: list[PairExample], pad_id: int,
                        device) -> list[PairExample]:
    """The training pairs to train on, with reference log-probs. A full fine-tune keeps no base
    copy: every dev pair gets its reference, then training pairs in random batches until
    REFERENCE_SHARE of the time to `cfg.train_deadline` is spent (at least one batch); pairs
    left without one are not trained on. They are computed on the fast path that trains
    (dpo_packed.py), whose numerics the policy's log-probs will have. With LoRA, all pairs
    (computed lazily)."""
    if cfg.method == "lora":
        return train
    loss, plan = pair_fast_path(base, cfg, device, max(len(ex) for ex in train + dev), base_weights=True)
    for batch in plan.batches(dev, seed=0):
        loss.fill_references(**plan.collate(batch, pad_id, device))
    start = time.time()
    share = REFERENCE_SHARE * (cfg.train_deadline - start) if cfg.train_deadline else float("inf")
    for i, batch in enumerate(plan.batches(train, seed=0)):
        if i and time.time() - start >= share:
            break
        loss.fill_references(**plan.collate(batch, pad_id, device))
    kept = [ex for ex in train if ex.ref is not None]
    if len(kept) < len(train):
        print(f"[dpo] reference log-probs for {len(kept)}/{len(train)} training pairs by "
              f"{time.time() - start:.1f}s (the deadline trains no more)", flush=True)
    return kept


DPO = Recipe(per_sample=dpo_per_sample, prepare=precompute_for_full, cut=cut_pair, dev_scale=4.0, fast=pair_fast_path)


def train_loop_per_worker(config: dict) -> dict:
    return run_recipe(config, DPO)
