"""Checks on a task's rows before any tokenising or worker start, for every dataset type.

`check_request` runs at start_training (cheap, no download): the URL's scheme and the
dataset_type's required fields, and for Chat a chat_template we render exactly (chatml, or
"tokenizer_default": the base tokenizer's own, whose presence is known once the model is
downloaded and the job tokenises its rows). `check_rows` runs in the job after the download: rows must be
objects with the dataset type's columns holding strings; rows with a null or missing required
value, or far longer than any sequence length, are dropped; what is left must hold enough
distinct rows to train on. Each failure is an `InputError` with a readable reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlparse

from cluster.protocol.wire import (
    ChatTemplateDatasetType,
    DpoDatasetType,
    GrpoDatasetType,
    InstructTextDatasetType,
    parse_dataset_type,
)
from trainers import chat_format
from trainers.instruct_format import DatasetError

# A row this long (in characters) is far beyond 4096 tokens in any tokenizer: drop it before
# tokenising, which would take long and be thrown away.
MAX_ROW_CHARS = 200_000
MIN_DISTINCT_ROWS = 8


class InputError(ValueError):
    """A job input that cannot be used; the message is the job's failure reason."""


@dataclass(frozen=True)
class Columns:
    required: tuple[str, ...]        # must be present, non-null and non-empty
    text: tuple[str, ...]            # must hold strings when present
    conversation: str | None = None  # chat: a list of {role, content} turns


def columns_of(dataset_type: dict) -> Columns:
    """The row columns a dataset type names, per the validator's field names."""
    try:
        dt = parse_dataset_type(dataset_type)
    except ValueError as exc:
        raise InputError(f"invalid dataset_type: {exc}") from exc
    if isinstance(dt, InstructTextDatasetType):
        _need(dt, "field_instruction")
        required = tuple(c for c in (dt.field_instruction, dt.field_output) if c)
        return Columns(required, required + tuple(c for c in (dt.field_input, dt.field_system) if c))
    if isinstance(dt, DpoDatasetType):
        for name in ("field_prompt", "field_chosen", "field_rejected"):
            _need(dt, name)
        required = (dt.field_prompt, dt.field_chosen, dt.field_rejected)
        return Columns(required, required + tuple(c for c in (dt.field_system,) if c))
    if isinstance(dt, GrpoDatasetType):
        _need(dt, "field_prompt")
        return Columns((dt.field_prompt,), (dt.field_prompt,))
    assert isinstance(dt, ChatTemplateDatasetType)
    _need(dt, "chat_column")
    try:
        chat_format.template_name(dt.model_dump())
    except DatasetError as exc:
        raise InputError(str(exc)) from None
    return Columns((dt.chat_column,), (), conversation=dt.chat_column)


def _need(dt, name: str) -> None:
    if not getattr(dt, name):
        raise InputError(f"dataset_type has no {name}")


def check_request(url: str, dataset_type: dict) -> str | None:
    """Why a training request cannot work, knowable before downloading anything; else None."""
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("http", "https"):
        return f"dataset URL must be http(s) (a presigned URL), got {scheme or 'no'} scheme"
    try:
        columns_of(dataset_type)
    except InputError as exc:
        return str(exc)
    return None


@dataclass
class RowReport:
    rows: list
    dropped_null: int = 0
    dropped_huge: int = 0
    distinct: int = 0


def check_rows(rows: list, dataset_type: dict, min_distinct: int = MIN_DISTINCT_ROWS,
               max_row_chars: int = MAX_ROW_CHARS) -> RowReport:
    cols = columns_of(dataset_type)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"row {i} is a JSON {type(row).__name__}, expected an object")
    for c in cols.required:
        if not any(c in row for row in rows):
            seen = sorted({k for row in rows[:100] for k in row})[:12]
            raise InputError(f"no row has column {c!r} (named by dataset_type); rows have {seen}")
    report = RowReport(rows=[])
    seen_rows: set[str] = set()
    for i, row in enumerate(rows):
        _check_types(i, row, cols)
        if any(row.get(c) in (None, "", []) for c in cols.required):
            report.dropped_null += 1
            continue
        if sum(len(row[c]) for c in cols.text if isinstance(row.get(c), str)) + _chat_chars(row, cols) > max_row_chars:
            report.dropped_huge += 1
            continue
        report.rows.append(row)
        seen_rows.add(json.dumps([row.get(c) for c in cols.text + (cols.conversation or "",)], sort_keys=True))
    report.distinct = len(seen_rows)
    if not report.rows:
        raise InputError(f"no usable rows: {report.dropped_null} of {len(rows)} have a null, empty or missing "
                         f"{'/'.join(cols.required)}; {report.dropped_huge} are over {max_row_chars} characters")
    if report.distinct < min_distinct:
        raise InputError(f"only {report.distinct} distinct usable row(s) in {len(rows)} "
                         f"(the rest are duplicates or unusable); at least {min_distinct} are needed")
    return report


def _check_types(i: int, row: dict, cols: Columns) -> None:
    for c in cols.text:
        value = row.get(c)
        if value is not None and not isinstance(value, str):
            raise InputError(f"row {i}: column {c!r} holds a {type(value).__name__}, expected a string")
    if cols.conversation and row.get(cols.conversation) is not None:
        turns = row[cols.conversation]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise InputError(f"row {i}: column {cols.conversation!r} must be a list of message objects")


def _chat_chars(row: dict, cols: Columns) -> int:
    if not cols.conversation or not isinstance(row.get(cols.conversation), list):
        return 0
    return sum(len(v) for t in row[cols.conversation] for v in t.values() if isinstance(v, str))
