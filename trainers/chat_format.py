"""Chat rows rendered and tokenised exactly as the validator evaluates them.

The validator runs axolotl's `chat_template` strategy (protocol doc §5.3, §7.3, §12.1; research
notes §8d; axolotl `prompt_strategies/chat_template.py`, defaults `roles_to_train: [assistant]`,
`train_on_eos: turn`, `eot_tokens: [eos_token]`):
- messages come from `chat_column`; each message's role is `chat_role_field`, its text
  `chat_content_field`; the role `chat_user_reference` becomes "user" and
  `chat_assistant_reference` becomes "assistant" (any other role is kept as is); a top-level
  `system` column, when present and the first message is not a system one, becomes a system turn;
- the conversation is rendered with the task's `chat_template`: "chatml" (synthetic tasks:
  `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, no BOS), "tokenizer_default"
  (continuous-SFT tasks: the base tokenizer's own jinja template, BOS and all, through
  `apply_chat_template`), or "tokenizer_default_fallback_<name>" (the tokenizer's own, else <name>);
- the text is tokenised in one piece WITHOUT added special tokens, as `apply_chat_template(...,
  tokenize=True)` does (the template writes the BOS itself when it wants one); a tokenizer that
  lacks the chatml tokens simply sees them as text;
- labels are the tokens of each assistant turn, found the way axolotl finds them: render the
  conversation up to the turn with the real content and with "[[dummy_message]]", and take the
  token span where the two differ (so a BPE merge across the content's edge is labelled as
  axolotl labels it, and the span is applied to the whole conversation's tokens even where a
  template renders a turn differently once later turns follow); plus the first EOS token within
  3 tokens after the span (chatml emits no EOS unless the tokenizer's EOS is <|im_end|>);
- samples with no label and samples longer than the evaluation length are dropped (formats.py
  picks that length).
"""
from __future__ import annotations

from typing import Callable

from jinja2.exceptions import TemplateError

from .instruct_format import IGNORE, DatasetError, Example, tokenize_each

DUMMY = "[[dummy_message]]"
TOKENIZER_DEFAULT = "tokenizer_default"
FALLBACK_PREFIX = "tokenizer_default_fallback_"
# axolotl's named templates that we render exactly, as the text each message renders to
# (its chatml.jinja: no BOS, no prefix, nothing between messages)
NAMED = {"chatml": "<|im_start|>{role}\n{content}<|im_end|>\n"}

# (turns, real_last_index) -> the conversation's text
Render = Callable[[list[dict], int], str]


def template_name(dt: dict) -> str:
    """The task's template name, checked without a tokenizer: a name we cannot render is a
    DatasetError (known at start_training, before any download)."""
    name = dt.get("chat_template") or "chatml"
    if not isinstance(name, str):
        raise DatasetError(f"chat_template must be a string, got {type(name).__name__}")
    fallback = name[len(FALLBACK_PREFIX):] if name.startswith(FALLBACK_PREFIX) else None
    if name != TOKENIZER_DEFAULT and (fallback or name) not in NAMED:
        raise DatasetError(f"chat_template {name!r} is not supported (have: {TOKENIZER_DEFAULT}, "
                           f"{', '.join(sorted(NAMED))}, {FALLBACK_PREFIX}<one of those>)")
    return name


def renderer(dt: dict, tokenizer) -> Render:
    """How the validator renders a conversation of this task with this (base) tokenizer."""
    name = template_name(dt)
    if name == TOKENIZER_DEFAULT or name.startswith(FALLBACK_PREFIX):
        if getattr(tokenizer, "chat_template", None):
            return lambda turns, last=0: _apply_template(tokenizer, turns, last)
        if name == TOKENIZER_DEFAULT:
            raise DatasetError("chat_template 'tokenizer_default' asks for the base tokenizer's own chat template, "
                               "but the base tokenizer has no chat template (no chat_template in tokenizer_config.json "
                               "and no chat_template.jinja): the validator cannot render this task either")
        name = name[len(FALLBACK_PREFIX):]
    fmt = NAMED[name]
    return lambda turns, last=0: "".join(fmt.format(role=t["role"], content=t["content"]) for t in turns)


def _apply_template(tokenizer, turns: list[dict], real_last_index: int) -> str:
    # axolotl's find_turn passes real_last_index (when non-zero) to the template; templates that
    # do not use it render the same either way
    extra = {"real_last_index": real_last_index} if real_last_index else {}
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False, **extra)


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


def _first(ids: list[int], token: int | None, start: int) -> int:
    """axolotl's find_first_eos_token, literally (from -1 after a turn it could not place, it
    looks at the last token first, and finding it there counts as not found)."""
    return next((i for i in range(start, len(ids)) if ids[i] == token), -1)


def tokenize_chat(row: dict, dt: dict, tokenizer, max_len: int, render: Render | None = None) -> Example | None:
    """One validator-identical example, or None when the validator would drop it (or its
    template refuses the conversation, e.g. a system turn a template does not allow)."""
    render = render or renderer(dt, tokenizer)
    turns = conversation(row, dt)
    if not turns:
        return None
    trained = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]  # other turns: no find_turn
    last = len(turns) - 1
    try:
        texts = [render(turns, 0)]
        for i in trained:
            texts += [render(turns[:i] + [{"role": "assistant", "content": DUMMY}], last), render(turns[:i + 1], last)]
    except TemplateError:
        return None
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = list(encoded[0])
    labels = [IGNORE] * len(ids)
    for k in range(len(trained)):
        start, end = _content_span(encoded[1 + 2 * k], encoded[2 + 2 * k])
        if start != -1:
            labels[start:end] = ids[start:end]
        eos = _first(ids, tokenizer.eos_token_id, end)
        if eos != -1 and abs(eos - end) <= 3:
            labels[eos] = ids[eos]
    if len(ids) > max_len or all(label == IGNORE for label in labels):
        return None
    return Example(ids, labels)


def tokenize_rows(rows: list[dict], dt: dict, tokenizer, max_len: int) -> tuple[list[Example], int]:
    """Tokenised examples and the number of rows dropped (too long, or nothing to learn)."""
    render = renderer(dt, tokenizer)
    return tokenize_each(rows, lambda i, row: tokenize_chat(row, dt, tokenizer, max_len, render),
                         f"no trainable rows: all {len(rows)} rows exceed {max_len} tokens or have no assistant turn")
