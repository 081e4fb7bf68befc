"""DPO on the fast path of packing.py: chosen and rejected of every pair packed padding-free into
one row (varlen attention, compiled decoder layers), the head's logits made only for completion
positions, chunk by chunk, fused with the per-sequence log-prob sums, the sigmoid loss and its
gradient (fused_loss.linear_dpo). The loss is trainers/dpo.py's per-pair loss, the validator's
(dpo_format.py), computed without a padded batch or a vocabulary-wide tensor of the whole batch.

The reference log-probs come from the same forward (so that an untrained policy's margin is 0, not
the difference of two kernels' rounding): with LoRA when a pair is first used, with the adapter
switched off, and kept on the example; a full fine-tune's before its first step (dpo.prepare).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

from .dpo_format import BETA, PairExample, sequences
from .fused_loss import CHUNK_ROWS, linear_dpo
from .instruct_format import IGNORE, Example
from .packing import CausalLMLoss, StepPlan, fast_plan, pack_batches

NO_BASE_COPY = ("full fine-tuning needs the reference log-probs before training (prepare) and keeps no base model to "
                "recompute them: a pair cut after running out of memory cannot be trained")


def pair_sequences(batch: list[PairExample]) -> list[Example]:
    """chosen then rejected of each pair, as examples whose labels are the completion tokens."""
    return [Example(ids, [t if m else IGNORE for t, m in zip(ids, mask)]) for ex in batch for ids, mask in sequences(ex)]


def scored(seq: Example) -> int:
    """Positions scored: those predicting a completion token (the first token is never predicted)."""
    return sum(1 for label in seq.labels[1:] if label != IGNORE)


@dataclass
class PairPlan(StepPlan):
    """StepPlan for pairs: a micro-batch's sequences laid out as SFT's (packed or padded), their
    scored rows, each row's sequence, and the pairs themselves (for their reference log-probs)."""

    def batches(self, examples: list[PairExample], seed: int) -> list[list[PairExample]]:
        """Packs of at most max_batch pairs too: the pairs per step the unpacked recipe took."""
        if self.packed:
            return pack_batches(examples, self.batch_tokens, seed, max_count=self.max_batch)
        return super().batches(examples, seed)

    def collate(self, batch: list[PairExample], pad_id: int, device: torch.device) -> dict:
        seqs = pair_sequences(batch)
        out = super().collate(seqs, pad_id, device)
        for unused in ("label_weights", "kl_index"):
            del out[unused]
        counts = [scored(s) for s in seqs]
        out["seq_index"] = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(counts)).to(
            device, non_blocking=True)
        out["pair_rows"] = [counts[i] + counts[i + 1] for i in range(0, len(counts), 2)]
        out["pairs"] = batch
        return out


class PairLoss(CausalLMLoss):
    """forward(**PairPlan.collate(...)) -> the mean DPO loss over the micro-batch's pairs
    (`return_losses`: the per-pair losses, without grad). Pairs without reference log-probs get
    them first, inside forward (where ZeRO-3 gathers the weights), from the base: the weights
    with the LoRA adapter off, or, with `base_weights`, the weights as they are (a full fine-tune
    before its first step, dpo.precompute_for_full); otherwise they are an error."""

    sample_losses = True  # forward(return_losses=True): one value per pair (instruct.Steps.dev_loss)

    def __init__(self, model, beta: float = BETA, chunk: int = CHUNK_ROWS, base_weights: bool = False,
                 smoothing: float = 0.0):
        super().__init__(model)
        self.beta, self.chunk, self.base_weights, self.smoothing = beta, chunk, base_weights, smoothing

    def _dpo(self, input_ids, label_index, label_targets, seq_index, pair_rows, reference, **layout):
        hidden, head = self._hidden(input_ids, **layout)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=input_ids.is_cuda):
            return linear_dpo(hidden.index_select(0, label_index), head, label_targets, seq_index, reference,
                              pair_rows, self.beta, self.chunk, self.smoothing)

    def forward(self, pairs: list[PairExample], return_losses: bool = False, **layout):
        self.fill_references(pairs, **layout)
        reference = torch.tensor([ex.ref for ex in pairs], dtype=torch.float32).T.contiguous().to(
            layout["input_ids"].device, non_blocking=True)
        mean, losses, _ = self._dpo(reference=reference, **layout)
        return losses if return_losses else mean

    @torch.no_grad()
    def fill_references(self, pairs: list[PairExample], **layout) -> None:
        """The base's (chosen, rejected) log-probs of the pairs that have none, by the forward that
        trains (the policy's numerics), in eval mode (no dropout). Called alone (no loss after it)
        only where ZeRO-3 does not shard the weights (dpo.precompute_for_full, the DPO benchmark)."""
        if all(ex.ref is not None for ex in pairs):
            return
        lora = hasattr(self.model, "disable_adapter")
        if not (lora or self.base_weights):
            raise RuntimeError(NO_BASE_COPY)
        was_training = self.model.training
        self.model.eval()
        with self.model.disable_adapter() if lora else contextlib.nullcontext():
            zeros = torch.zeros((2, len(pairs)), device=layout["input_ids"].device)
            _, _, policy = self._dpo(**layout, reference=zeros)
        self.model.train(was_training)
        for ex, c, r in zip(pairs, *policy.tolist()):
            if ex.ref is None:
                ex.ref = (c, r)


def pair_fast_path(model, cfg, device: torch.device, longest: int, reference=None,
                   base_weights: bool = False) -> tuple[PairLoss, PairPlan]:
    """The DPO loss module and plan (packing.fast_path's for pairs); `reference` is unused: the
    base's log-probs come from the adapter switched off (LoRA) or, with `base_weights`, from
    the model as it is (dpo.precompute_for_full, before training)."""
    plan = fast_plan(model, cfg, device, longest)
    loss = PairLoss(model, base_weights=base_weights, smoothing=cfg.dpo_label_smoothing)
    return loss, PairPlan(**{f.name: getattr(plan, f.name) for f in fields(plan)})
