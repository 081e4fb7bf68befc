"""Each text task type's validator-identical tokenisation, behind one call, at the sequence
length the validator evaluates it at. Tokenisers return (examples, rows dropped) and raise
DatasetError with a readable reason for data they cannot use.

Lengths (G.O.D `validator/evaluation/evaluators/instruct_text.py` and `dpo.py`; research notes §6, §7):
- Instruct and Chat: axolotl drops samples longer than `sequence_len`, which starts at 4096
  (ceil(max_position_embeddings / 2) for models under 8192 positions); only when NO sample
  survives does the evaluator retry at 2x, 4x, ... that length, up to the cap min(max_position_
  embeddings (131072 when missing), tokenizer.model_max_length when 0 < it < 1_000_000), the cap
  itself being the last try. Training, its dev split and trainers/evaluate.py pick the length
  by the same rule on their rows (`tokenize_task`).
- DPO: pairs are cut (not dropped) at the model's max_position_embeddings (8192 when missing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import chat_format, dpo_format, instruct_format
from .instruct_format import DatasetError, eval_sequence_length

FORMATS = {
    "InstructTextTask": instruct_format.tokenize_rows,
    "ChatTask": chat_format.tokenize_rows,
    "DpoTask": dpo_format.tokenize_rows,
}
DROPPED_WHEN_LONG = ("InstructTextTask", "ChatTask")  # the others' rows are cut, not dropped
MISSING_POSITIONS = 131_072       # the evaluator's cap when the config has no max_position_embeddings
TOKENIZER_MAX_TRUSTED = 1_000_000  # a model_max_length at or above this is the "no limit" placeholder


@dataclass(frozen=True)
class Tokenized:
    examples: list
    dropped: int   # rows the validator would not score at `max_len` (too long, nothing to learn)
    max_len: int   # the sequence length chosen


def tokenize_rows(task_type: str, rows: list, dataset_type: dict, tokenizer, max_len: int):
    if task_type not in FORMATS:
        raise DatasetError(f"no formatter for task type {task_type!r} (have: {sorted(FORMATS)})")
    if not isinstance(rows, list):
        raise DatasetError(f"the training file must be a JSON array, got {type(rows).__name__}")
    return FORMATS[task_type](rows, dataset_type, tokenizer, max_len)


def _positions(model_config) -> int | None:
    value = getattr(model_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def length_candidates(start: int, cap: int) -> list[int]:
    """The evaluator's `_sequence_len_candidates`: start, 2x start, ... up to cap, cap last."""
    start, cap = start if start > 0 else 2048, cap if cap > 0 else 8192
    if start > cap:
        return [cap]
    out = [start]
    while out[-1] < cap:
        out.append(min(out[-1] * 2, cap))
    return out


def sequence_lengths(task_type: str, model_config, tokenizer, override: int | None = None) -> list[int]:
    """The lengths the validator would evaluate this task's rows at, in the order it tries them."""
    if override:
        return [override]
    positions = _positions(model_config)
    if task_type == "DpoTask":
        return [positions or dpo_format.FALLBACK_MAX_LEN]
    cap = positions or MISSING_POSITIONS
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < TOKENIZER_MAX_TRUSTED:
        cap = min(cap, tokenizer_max)
    return length_candidates(eval_sequence_length(positions), cap)


def tokenize_task(task_type: str, rows: list, dataset_type: dict, tokenizer, model_config,
                  override: int | None = None, log: Callable[[str], None] = print) -> Tokenized:
    """The rows as the validator tokenises them, at the first of its lengths that keeps a row.
    Tokenised once at the longest length: a row dropped there is dropped at every length, and
    at a shorter one exactly the longer examples go too. No row even at the longest (or no
    label anywhere) is the tokeniser's DatasetError, which names that length."""
    lengths = sequence_lengths(task_type, model_config, tokenizer, override)
    examples, dropped = tokenize_rows(task_type, rows, dataset_type, tokenizer, lengths[-1])
    if task_type not in DROPPED_WHEN_LONG:
        return Tokenized(examples, dropped, lengths[-1])
    for length in lengths:
        kept = [ex for ex in examples if len(ex) <= length]
        if kept:
            break
    if length != lengths[0]:
        log(f"[format] no {task_type} row fits in {lengths[0]} tokens: the validator retries at doubled "
            f"lengths up to {lengths[-1]}; using {length} ({len(kept)} of {len(rows)} rows)")
    return Tokenized(kept, dropped + len(examples) - len(kept), length)
