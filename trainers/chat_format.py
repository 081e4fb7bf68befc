"""Chat rows rendered and tokenised exactly as the validator evaluates them.

The validator runs axolotl's `chat_template` strategy (protocol doc §5.3, §7.3, §12.1; axolotl
`prompt_strategies/chat_template.py` in the validator image of 2025-04):
- messages come from `chat_column`; each message's role is `chat_role_field`, its text
  `chat_content_field`; the role `chat_user_reference` becomes "user" and
  `chat_assistant_reference` becomes "assistant" (any other role is kept as is); a top-level
  `system` column, when present and the first message is not a system one, becomes a system turn;
- the whole conversation is rendered with the task's template (chatml for synthetic tasks:
  `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, no BOS) and tokenised in one piece
  without added special tokens; a tokenizer that lacks the chatml tokens simply sees them as text;
- labels are the tokens of each assistant turn, found the way axolotl finds them: render the
  conversation up to the turn with the real content and with "[[dummy_message]]", and take the
  token span where the two differ (so a BPE merge across the content's edge is labelled as
  axolotl labels it); plus the first EOS token within 3 tokens after the turn (chatml emits no
  EOS unless the tokenizer's EOS is <|im_end|>);
- samples with no label and samples longer than the evaluation length are dropped.
"""
from __future__ import annotations

from .instruct_format import IGNORE, DatasetError, Example, tokenize_each

DUMMY = "[[dummy_message]]"
# axolotl's named templates, as the text each message renders to (chatml has no BOS or prefix)
TEMPLATES = {"chatml": "<|im_start|>{role}\n{content}<|im_end|>\n"}


def render(turns: list[dict], template: str) -> str:
    return "".join(TEMPLATES[template].format(role=t["role"], content=t["content"]) for t in turns)


def check_dataset_type(dt: dict) -> str:
    template = dt.get("chat_template") or "chatml"
    if template not in TEMPLATES:
        raise DatasetError(f"chat_template {template!r} is not supported (have: {sorted(TEMPLATES)})")
    return template


def conversation(row: dict, dt: dict) -> list[dict]:
    """The row's turns as {"role", "content"} after the validator's role mapping."""
    column = dt.get("chat_column") or "conversations"
    role_field = dt.get("chat_role_field") or "from"
    content_field = dt.get("chat_content_field") or "value"
    roles = {dt.get("chat_user_reference") or "user": "user",
             dt.get("chat_assistant_reference") or "assistant": "assistant"}
    messages = row.get(column) if isinstance(row, dict) else None
    if not isinstance(messages, list):
        raise DatasetError(f"column {column!r} must hold a list of messages, got {type(messages).__name__}")
    turns = []
    for m in messages:
        role = m.get(role_field) if isinstance(m, dict) else None
        content = m.get(content_field) if isinstance(m, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise DatasetError(f"each message needs string fields {role_field!r} and {content_field!r}; got {m!r:.120}")
        turns.append({"role": roles.get(role, role), "content": content})
    if turns and turns[0]["role"] != "system" and isinstance(row.get("system"), str):
        turns.insert(0, {"role": "system", "content": row["system"]})
    return turns


def _content_span(dummy: list[int], full: list[int]) -> tuple[int, int]:
    """axolotl's find_turn: first and last positions where the two renderings differ."""
    n = min(len(dummy), len(full))
    start = next((i for i in range(n) if dummy[i] != full[i]), None)
    end = next((len(full) - i for i in range(n) if dummy[len(dummy) - 1 - i] != full[len(full) - 1 - i]), None)
    if start is None or end is None or end <= start:
        return -1, -1
    return start, end


def tokenize_chat(row: dict, dt: dict, tokenizer, max_len: int) -> Example | None:
    """One validator-identical example, or None when the validator would drop it."""
    template = check_dataset_type(dt)
    turns = conversation(row, dt)
    if not turns:
        return None
    texts = [render(turns, template)]
    for i, turn in enumerate(turns):
        texts += [render(turns[:i] + [{"role": turn["role"], "content": DUMMY}], template), render(turns[:i + 1], template)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = list(encoded[0])
    labels = [IGNORE] * len(ids)
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start, end = _content_span(encoded[1 + 2 * i], encoded[2 + 2 * i])
        if start == -1:
            continue
        labels[start:end] = ids[start:end]
        eos = next((j for j in range(end, len(ids)) if ids[j] == tokenizer.eos_token_id), -1)
        if eos != -1 and eos - end <= 3:
            labels[eos] = ids[eos]
    if len(ids) > max_len or all(label == IGNORE for label in labels):
        return None
    return Example(ids, labels)


def tokenize_rows(rows: list[dict], dt: dict, tokenizer, max_len: int) -> tuple[list[Example], int]:
    """Tokenised examples and the number of rows dropped (too long, or nothing to learn)."""
    check_dataset_type(dt)
    return tokenize_each(rows, lambda i, row: tokenize_chat(row, dt, tokenizer, max_len),
                         f"no trainable rows: all {len(rows)} rows exceed {max_len} tokens or have no assistant turn")
