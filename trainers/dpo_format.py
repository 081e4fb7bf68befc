"""DPO pairs tokenised and scored exactly as the validator evaluates them: the per-pair loss of
G.O.D's `validator/evaluation/evaluators/dpo.py` (`_tokenize_dpo_pair`, `_completion_logprob`),
the vector the boss and knockout rounds compare pair by pair (research notes §7, §8b):
- only the prompt/chosen/rejected columns are used: the system column is dropped and the
  task's prompt/chosen/rejected formats are NOT applied; no chat template;
- chosen and rejected get the EOS token's text appended unless they already end with it;
- the prompt is tokenised alone, and prompt+chosen and prompt+rejected each in one piece, all
  with the tokenizer's own special tokens (a BOS where it adds one); a completion is what
  follows the first len(prompt tokens) tokens of prompt+completion (a BPE merge across the
  boundary lands in the completion), and the scored sequence is prompt tokens + completion;
- the sequence keeps its first `max_len` tokens: the model's max_position_embeddings, 8192
  when the config has none (formats.py); a pair whose completion is then empty (prompt at
  least max_len tokens) scores NaN there, which the paired comparison skips: it is dropped here;
- a completion's log-prob is the SUM of its remaining tokens' log-probs (with an empty prompt
  and no BOS, its first token is not scored: nothing predicts it);
- loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with beta 0.1 and the base
  model as reference (ln 2 when nothing was learnt). Empty prompts and completions are kept
  (an empty completion is its EOS), as the validator scores them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .instruct_format import DatasetError, tokenize_each

BETA = 0.1
FALLBACK_MAX_LEN = 8192  # the evaluator's max_length when the config has no max_position_embeddings


@dataclass
class PairExample:
    """The tokens the validator scores (already cut to its max length)."""
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


def tokenize_pair(row: dict, dt: dict, tokenizer, max_len: int) -> PairExample | None:
    """The pair as scored, or None when the validator's loss for it is NaN (empty completion)."""
    texts = []
    for column in _columns(dt):
        value = row.get(column)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DatasetError(f"column {column!r} must hold strings, got {type(value).__name__}")
        texts.append(value)
    prompt, chosen, rejected = texts
    eos = tokenizer.eos_token
    if eos is not None:
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt_ids, with_chosen, with_rejected = tokenizer([prompt, prompt + chosen, prompt + rejected])["input_ids"]
    n = len(prompt_ids)
    room = max(0, max_len - n)
    ex = PairExample(list(prompt_ids[:max_len]), list(with_chosen[n:])[:room], list(with_rejected[n:])[:room])
    return ex if ex.chosen and ex.rejected else None


def tokenize_rows(rows: list[dict], dt: dict, tokenizer, max_len: int) -> tuple[list[PairExample], int]:
    """Tokenised pairs and the number of rows dropped (no completion token left at `max_len`).
    Long pairs are cut, not dropped, as the validator cuts them."""
    columns = _columns(dt)

    def pair(i: int, row: dict) -> PairExample | None:
        missing = [c for c in columns if c not in row]
        if missing:
            raise DatasetError(f"row {i} lacks column(s) {missing}; it has {sorted(row)[:10]}")
        return tokenize_pair(row, dt, tokenizer, max_len)

    examples, dropped = tokenize_each(rows, pair, f"no trainable pairs among {len(rows)} rows: every prompt fills "
                                                  f"the {max_len}-token sequence, leaving no completion token")
    # A pair with chosen == rejected scores ln 2 whatever the weights (kept: the validator scores
    # it too) and gives no gradient; a dataset of nothing else cannot be trained on.
    if all(ex.chosen == ex.rejected for ex in examples):
        raise DatasetError(f"no trainable pairs among {len(rows)} rows: chosen == rejected in every one")
    return examples, dropped


def cut_pair(ex: PairExample, length: int) -> PairExample:
    """The OOM ladder's cut: each sequence keeps at most length // 2 tokens (so len() <= length),
    the completions their first tokens and the prompt its last ones, the completions getting at
    least half when the prompt is long: what fits still teaches the pair's preference (a
    prompt-first cut would leave a long prompt's pair nothing to learn). The reference
    log-probs were of the whole pair: dropped, to be recomputed on what is left
    (dpo.ensure_reference)."""
    width = max(2, length // 2)
    room = min(max(len(ex.chosen), len(ex.rejected)), max(width // 2, width - len(ex.prompt)))
    keep = width - room
    return PairExample(ex.prompt[len(ex.prompt) - keep:] if keep else [], ex.chosen[:room], ex.rejected[:room])


def sequences(ex: PairExample) -> list[tuple[list[int], list[int]]]:
    """(input ids, completion mask) of the chosen and of the rejected sequence."""
    return [(ex.prompt + completion, [0] * len(ex.prompt) + [1] * len(completion))
            for completion in (ex.chosen, ex.rejected)]


def sequence_logps(model, batch: list[PairExample], pad_id: int, device) -> torch.Tensor:
    """Summed completion log-probs, shape [2, len(batch)]: row 0 chosen, row 1 rejected. Only the
    completion positions' logits go to fp32 (a long prompt's would not fit beside them)."""
    seqs = [s for ex in batch for s in sequences(ex)]  # chosen, rejected, chosen, ...
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    scored = torch.zeros((len(seqs), width), dtype=torch.bool)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (seq, mask) in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        scored[row, :len(seq)] = torch.tensor(mask, dtype=torch.bool)
    ids, scored, attention = ids.to(device), scored.to(device), attention.to(device)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1, :]
    keep = scored[:, 1:]  # logits at position t predict token t + 1 (position 0 is never scored)
    rows = torch.arange(len(seqs), device=device)[:, None].expand_as(keep)[keep]
    token_logps = -F.cross_entropy(logits[keep].float(), ids[:, 1:][keep], reduction="none")
    sums = torch.zeros(len(seqs), device=device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    return sums.view(len(batch), 2).T


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Per-pair sigmoid DPO loss from [2, B] (chosen; rejected) log-probs."""
    margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
    return -F.logsigmoid(beta * margin)
