"""The OOM ladder: a micro-batch that runs out of accelerator memory is not a crash.

First the micro-batch is halved (the halves run one after the other, each loss weighted by its
share, so the gradient is the same); the smaller size is remembered for the rest of the run.
When a single example still does not fit, its sequence length is halved (the example is cut,
and the cut length remembered); only below `min_len` does the error propagate.
With several workers it always propagates (`solo=False`): a rank that splits its batch runs
more forward/backward passes than the others, so their collectives (DDP's all-reduce, ZeRO-3's
gathers) would stop matching and the group would hang instead of failing.
"""
from __future__ import annotations

from typing import Callable

import torch


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OomLadder:
    def __init__(self, cut: Callable | None, min_len: int = 64, log: Callable = print, solo: bool = True):
        self.solo = solo
        self.cut = cut               # (example, length) -> the example cut to `length` tokens; None: never cut
        self.min_len = min_len
        self.max_examples: int | None = None
        self.max_len: int | None = None
        self.log = log

    def run(self, batch: list, step: Callable[[list, float], float]) -> float:
        """Runs step(sub_batch, weight) (forward + backward of weight * mean loss) over the
        batch, in pieces small enough to fit; returns the batch's mean loss."""
        if self.max_len is not None:
            batch = [self.cut(ex, self.max_len) if len(ex) > self.max_len else ex for ex in batch]
        size = min(len(batch), self.max_examples or len(batch))
        pieces = [batch[i:i + size] for i in range(0, len(batch), size)]
        total = 0.0
        for piece in pieces:
            total += self._fit(piece, step, len(piece) / len(batch))
        return total

    def _fit(self, piece: list, step: Callable, weight: float) -> float:
        """weight * the piece's mean loss, its gradient accumulated."""
        try:
            return step(piece, weight) * weight
        except torch.OutOfMemoryError:
            if not self.solo:
                raise
            _free()
        if len(piece) > 1:
            half = len(piece) // 2
            self.max_examples = half
            self.log(f"[oom] micro-batch of {len(piece)} does not fit: {half} examples per micro-batch from now on")
            return sum(self._fit(part, step, weight * len(part) / len(piece)) for part in (piece[:half], piece[half:]))
        length = len(piece[0]) // 2
        if self.cut is None or length < self.min_len:
            raise torch.OutOfMemoryError(f"one example of {len(piece[0])} tokens does not fit in memory")
        self.max_len = length
        self.log(f"[oom] one example of {len(piece[0])} tokens does not fit: sequences cut to {length} from now on")
        return self._fit([self.cut(piece[0], length)], step, weight)
