"""Each text task type's validator-identical tokenisation, behind one call, and the sequence
length it is evaluated at. Tokenisers return (examples, rows dropped) and raise DatasetError
with a readable reason for data they cannot use."""
from __future__ import annotations

from . import chat_format, dpo_format, instruct_format
from .instruct_format import DatasetError, eval_sequence_length

FORMATS = {
    "InstructTextTask": instruct_format.tokenize_rows,
    "ChatTask": chat_format.tokenize_rows,
    "DpoTask": dpo_format.tokenize_rows,
}


def tokenize_rows(task_type: str, rows: list, dataset_type: dict, tokenizer, max_len: int):
    if task_type not in FORMATS:
        raise DatasetError(f"no formatter for task type {task_type!r} (have: {sorted(FORMATS)})")
    if not isinstance(rows, list):
        raise DatasetError(f"the training file must be a JSON array, got {type(rows).__name__}")
    return FORMATS[task_type](rows, dataset_type, tokenizer, max_len)


def max_length(task_type: str, model_config, override: int | None = None) -> int:
    """The validator's length: TRL's max_length for DPO; axolotl's sequence_len otherwise."""
    if override:
        return override
    if task_type == "DpoTask":
        return dpo_format.MAX_LEN
    return eval_sequence_length(getattr(model_config, "max_position_embeddings", None))
