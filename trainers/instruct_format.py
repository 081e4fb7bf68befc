"""Instruct rows rendered and tokenised exactly as the validator evaluates them.

The validator uses axolotl's `user_defined` instruct strategy (protocol doc §5.3, §7.3):
- prompt = [system_format(system)] + format(instruction, input), where `format` defaults to
  "{instruction} {input}" when the dataset has an input column and the row's input is
  non-empty, else `no_input_format` (default "{instruction}"); no chat template;
- prompt and output are tokenised separately with the *base* tokenizer: the prompt keeps the
  special tokens the tokenizer adds by itself (e.g. BOS), the output loses a leading BOS and
  gets EOS appended; nothing is inserted between them;
- labels are -100 on the prompt: loss on output + EOS only;
- samples longer than the evaluation length are dropped (4096, or ceil(max_pos/2) when the
  model's max_position_embeddings is below 8192; longer when no sample fits: formats.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

IGNORE = -100


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message is shown to the operator as is."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def eval_sequence_length(max_position_embeddings: int | None) -> int:
    """The evaluator's first sequence_len (formats.sequence_lengths: the retries after it)."""
    if max_position_embeddings and max_position_embeddings < 8192:
        return math.ceil(max_position_embeddings / 2)
    return 4096


def _text(row: dict, column: str | None) -> str:
    if not column:
        return ""
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"column {column!r} must hold strings, got {type(value).__name__}")
    return value


def render_prompt(row: dict, dt: dict) -> str:
    """The prompt text for one row, per the task's InstructTextDatasetType `dt`."""
    instruction = _text(row, dt.get("field_instruction"))
    inp = _text(row, dt.get("field_input")) if dt.get("field_input") else ""
    if dt.get("field_input") and inp:
        fmt = dt.get("format") or "{instruction} {input}"
    else:
        fmt = dt.get("no_input_format") or "{instruction}"
    prompt = fmt.format(instruction=instruction, input=inp)
    system = _text(row, dt.get("field_system")) if dt.get("field_system") else ""
    system = system or (dt.get("system_prompt") or "")
    if system:
        prompt = (dt.get("system_format") or "{system}").format(system=system) + prompt
    return prompt


def check_columns(rows: list, dt: dict) -> None:
    """Readable errors for rows that do not match the dataset type, before any tokenising."""
    if not dt.get("field_instruction"):
        raise DatasetError("dataset_type has no field_instruction")
    needed = [c for c in (dt.get("field_instruction"), dt.get("field_output")) if c]
    for i, row in enumerate(rows[:1000]):
        if not isinstance(row, dict):
            raise DatasetError(f"row {i} is a {type(row).__name__}, expected an object")
        missing = [c for c in needed if c not in row]
        if missing:
            raise DatasetError(f"row {i} lacks column(s) {missing}; it has {sorted(row)[:10]}")


def tokenize_instruct(row: dict, dt: dict, tokenizer, max_len: int) -> Example | None:
    """One validator-identical training example, or None when the validator would drop it."""
    prompt = render_prompt(row, dt)
    prompt_ids = tokenizer(prompt)["input_ids"]
    if dt.get("field_output"):
        output_ids = tokenizer(_text(row, dt["field_output"]))["input_ids"]
        if output_ids and tokenizer.bos_token_id is not None and output_ids[0] == tokenizer.bos_token_id:
            output_ids = output_ids[1:]
        output_ids = output_ids + [tokenizer.eos_token_id]
        ids = prompt_ids + output_ids
        labels = [IGNORE] * len(prompt_ids) + list(output_ids)
    else:  # axolotl "completion": the whole text is the target
        ids = prompt_ids + [tokenizer.eos_token_id]
        labels = list(ids)
    if len(ids) > max_len:
        return None
    return Example(ids, labels)


def tokenize_rows(rows: list[dict], dt: dict, tokenizer, max_len: int) -> tuple[list[Example], int]:
    """Tokenised examples and the number of rows dropped for length."""
    check_columns(rows, dt)
    return tokenize_each(rows, lambda i, row: tokenize_instruct(row, dt, tokenizer, max_len),
                         f"no trainable rows: all {len(rows)} rows exceed {max_len} tokens or are empty")


def tokenize_each(rows: list, tokenize, nothing_left: str) -> tuple[list, int]:
    """`tokenize(index, row)` over every row (None = dropped) -> (examples, dropped); a row that is
    not an object, or no example left, is a DatasetError (shared by every task type)."""
    examples, dropped = [], 0
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DatasetError(f"row {i} is a {type(row).__name__}, expected an object")
        ex = tokenize(i, row)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise DatasetError(nothing_left)
    return examples, dropped
