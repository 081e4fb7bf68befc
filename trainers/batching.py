"""Dev split, length-grouped micro-batches and padding for tokenised examples."""
from __future__ import annotations

import random

import torch

from .instruct_format import IGNORE, Example


def split_dev(examples: list[Example], fraction: float, max_dev: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out dev split for checkpoint selection; identical on every worker (fixed seed):
    stratified by length, near-duplicates on one side (dev_split.py)."""
    from .dev_split import split_dev as stratified

    return stratified(examples, fraction, max_dev, seed)


def make_batches(examples: list[Example], batch_tokens: int, max_batch: int, seed: int) -> list[list[Example]]:
    """Groups examples of similar length so that padding stays small; batch order is shuffled.
    A batch holds at most `batch_tokens` padded tokens (always at least one example)."""
    rng = random.Random(seed)
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]), rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        ex = examples[i]
        new_longest = max(longest, len(ex))
        if current and (new_longest * (len(current) + 1) > batch_tokens or len(current) >= max_batch):
            batches.append(current)
            current, new_longest = [], len(ex)
        current.append(ex)
        longest = new_longest
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(batch: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(ex) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of each sample over its label tokens: the validator's metric
    (HF Trainer.evaluate at batch size 1) is the mean of these over samples."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != IGNORE).sum(dim=1).clamp(min=1)
    return tok.sum(dim=1) / counts
