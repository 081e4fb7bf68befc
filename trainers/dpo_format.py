"""DPO pairs tokenised and scored exactly as the validator evaluates them (protocol doc §7.4,
§12.1; TRL 0.17 `DPOTrainer` in the validator image):
- only the prompt/chosen/rejected columns are used: the system column is dropped and the
  task's prompt/chosen/rejected formats are NOT applied; no chat template;
- prompt, chosen and rejected are tokenised separately without added special tokens (so no
  BOS, even for tokenizers that add one); chosen and rejected get EOS appended;
- the prompt keeps its last 512 tokens; prompt + completion is cut to 1024 tokens from the
  left ("keep_end"), the same columns for chosen and rejected (evaluation batch size 1);
- a sequence's log-probability is the sum of its completion tokens' log-probs;
- loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with beta 0.1 and the base
  model as reference; the metric is its mean over pairs (ln 2 when nothing was learnt).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .instruct_format import IGNORE, DatasetError, tokenize_each

BETA = 0.1
MAX_PROMPT_LEN = 512
MAX_LEN = 1024


@dataclass
class PairExample:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref: tuple[float, float] | None = None  # the reference model's (chosen, rejected) log-probs

    def __len__(self) -> int:  # padded tokens of both sequences, for batching
        return 2 * (len(self.prompt) + max(len(self.chosen), len(self.rejected)))


def _columns(dt: dict) -> tuple[str, str, str]:
    cols = (dt.get("field_prompt"), dt.get("field_chosen"), dt.get("field_rejected"))
    if not all(cols):
        raise DatasetError("dataset_type needs field_prompt, field_chosen and field_rejected")
    return cols


def tokenize_pair(row: dict, dt: dict, tokenizer) -> PairExample | None:
    texts = []
    for column in _columns(dt):
        value = row.get(column)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DatasetError(f"column {column!r} must hold strings, got {type(value).__name__}")
        texts.append(value)
    if not all(texts):
        return None  # the validator drops pairs with an empty field
    prompt, chosen, rejected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return PairExample(list(prompt)[-MAX_PROMPT_LEN:], list(chosen) + [eos], list(rejected) + [eos])


def tokenize_rows(rows: list[dict], dt: dict, tokenizer, max_len: int = MAX_LEN) -> tuple[list[PairExample], int]:
    """Tokenised pairs and the number of rows dropped (an empty field). Long pairs are cut,
    not dropped, as TRL does (`max_len` is applied when the pair is scored)."""
    columns = _columns(dt)

    def pair(i: int, row: dict) -> PairExample | None:
        missing = [c for c in columns if c not in row]
        if missing:
            raise DatasetError(f"row {i} lacks column(s) {missing}; it has {sorted(row)[:10]}")
        return tokenize_pair(row, dt, tokenizer)

    examples, dropped = tokenize_each(rows, pair, f"no trainable pairs among {len(rows)} rows "
                                                  "(every one has an empty field)")
    # A pair with chosen == rejected scores ln 2 whatever the weights (kept: the validator scores
    # it too) and gives no gradient; a dataset of nothing else cannot be trained on.
    if all(ex.chosen == ex.rejected for ex in examples):
        raise DatasetError(f"no trainable pairs among {len(rows)} rows: chosen == rejected in every one")
    return examples, dropped


def sequences(ex: PairExample, max_len: int = MAX_LEN) -> list[tuple[list[int], list[int]]]:
    """(input ids, completion mask) of the chosen and of the rejected sequence, cut like TRL's
    keep_end truncation of the [chosen; rejected] batch."""
    width = len(ex.prompt) + max(len(ex.chosen), len(ex.rejected))
    cut = max(0, width - max_len)
    out = []
    for completion in (ex.chosen, ex.rejected):
        ids = ex.prompt + completion
        mask = [0] * len(ex.prompt) + [1] * len(completion)
        out.append((ids[cut:], mask[cut:]))
    return out


def sequence_logps(model, batch: list[PairExample], pad_id: int, device, max_len: int = MAX_LEN) -> torch.Tensor:
    """Summed completion log-probs, shape [2, len(batch)]: row 0 chosen, row 1 rejected."""
    seqs = [s for ex in batch for s in sequences(ex, max_len)]  # chosen, rejected, chosen, ...
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (seq, mask) in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        labels[row, :len(seq)] = torch.tensor([t if m else IGNORE for t, m in zip(seq, mask)])
    ids, labels, attention = ids.to(device), labels.to(device), attention.to(device)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1, :].float()
    target = labels[:, 1:]
    token_logps = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                   ignore_index=IGNORE, reduction="none").view(target.shape)
    return token_logps.sum(dim=1).view(len(batch), 2).T


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Per-pair sigmoid DPO loss from [2, B] (chosen; rejected) log-probs."""
    margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
    return -F.logsigmoid(beta * margin)
