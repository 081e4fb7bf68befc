"""The validators' metrics, computed our way on any submission, with the base tokenizer:
- Instruct and Chat: mean over samples of the per-sample mean cross-entropy on the labelled
  tokens (output + EOS; assistant turns), dropping samples longer than the evaluation length
  (doubled when no sample fits: formats.tokenize_task);
- DPO: mean sigmoid DPO loss at beta 0.1 against the base model as reference, pairs cut at the
  model's max_position_embeddings (the mean of the validator's per-pair vector);
- KL-weighted Instruct (USE_KL=1, KL_COEF=c): the loss + c x mean per-token KL(model || base).
The same per-sample functions are the training loop's dev metric. A submission loads as a
full model or as a PEFT adapter (base from its adapter_config.json). `METRICS` maps a task
type to its metric; a new task type registers its own there (and its loop in launch.RECIPES)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .batching import make_batches
from .dpo import DPO, fill_reference
from .formats import tokenize_task
from .grpo_eval import score_model
from .instruct import SFT, dev_loss
from .instruct_format import IGNORE
from .modeling import load_submission, load_tokenizer

BATCH_TOKENS = 16384


def _device(model) -> torch.device:
    return next(model.parameters()).device


def sft_loss(model, base_model: str, rows: list[dict], dataset_type: dict, task_type: str = "InstructTextTask") -> float:
    tokenizer = load_tokenizer(str(base_model))
    examples = tokenize_task(task_type, rows, dataset_type, tokenizer, model.config).examples
    return dev_loss(model, examples, tokenizer.pad_token_id, _device(model), BATCH_TOKENS, SFT)


@torch.no_grad()
def mean_kl_to_base(model, base, examples) -> float:
    """The validator's KL term (evaluators/instruct_text.py): KL(model || base) over the full
    vocabulary at every position whose label is set (its mask is not shifted), summed over the
    set and divided by the number of such positions; one sample at a time."""
    device = _device(model)
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids], device=device)
        mask = torch.tensor([ex.labels], device=device) != IGNORE
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        logq = torch.log_softmax(base(input_ids=ids.to(_device(base))).logits.float().to(device), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        total += float((kl * mask).sum())
        count += int(mask.sum())
    return total / count if count else 0.0


def kl_weighted_terms(model, base_model: str, rows: list[dict], dataset_type: dict, task_type: str = "InstructTextTask",
                      base=None) -> tuple[float, float]:
    """(eval_loss, KL) of a KL-weighted Instruct task; its score is eval_loss + kl_coef x KL."""
    tokenizer = load_tokenizer(str(base_model))
    examples = tokenize_task(task_type, rows, dataset_type, tokenizer, model.config).examples
    loss = dev_loss(model, examples, tokenizer.pad_token_id, _device(model), BATCH_TOKENS, SFT)
    base = base if base is not None else load_submission(base_model).to(_device(model))
    return float(loss), mean_kl_to_base(model, base, examples)


def instruct_loss(model, tokenizer_path: str, rows: list[dict], dataset_type: dict) -> float:
    return sft_loss(model, tokenizer_path, rows, dataset_type, "InstructTextTask")


def chat_loss(model, base_model: str, rows: list[dict], dataset_type: dict) -> float:
    return sft_loss(model, base_model, rows, dataset_type, "ChatTask")


def fill_references(base, examples: list, pad_id: int) -> None:
    """The base's (chosen, rejected) log-probs on every DPO pair (dpo.fill_reference), in batches
    of at most BATCH_TOKENS padded tokens, on the base's device."""
    for batch in make_batches(examples, BATCH_TOKENS, 16, seed=0):
        fill_reference(base, batch, pad_id, _device(base))


def dpo_eval_loss(model, base_model: str, rows: list[dict], dataset_type: dict, reference=None) -> float:
    """The reference is the base model (loaded here unless given)."""
    tokenizer = load_tokenizer(str(base_model))
    examples = tokenize_task("DpoTask", rows, dataset_type, tokenizer, model.config).examples
    reference = reference if reference is not None else load_submission(base_model)
    fill_references(reference, examples, tokenizer.pad_token_id)
    return dev_loss(model, examples, tokenizer.pad_token_id, _device(model), BATCH_TOKENS, DPO)


def grpo_reward(model, base_model: str, rows: list[dict], dataset_type: dict) -> float:
    """Weighted reward of sampled completions minus beta x KL to the base (reward functions run
    in the sandbox, never in this process)."""
    return score_model(model, base_model, rows, dataset_type).score


# task type -> metric(model, base model path, rows, dataset_type) -> float; lower is better
# unless the task type is in HIGHER_IS_BETTER (a reward)
METRICS = {"InstructTextTask": instruct_loss, "ChatTask": chat_loss, "DpoTask": dpo_eval_loss,
           "GrpoTask": grpo_reward}
HIGHER_IS_BETTER: set[str] = {"GrpoTask"}
KL_WEIGHTED = {"InstructTextTask", "ChatTask"}  # the evaluator that adds KL_COEF x KL (instruct_text.py)


def evaluate_model(model, base_model: str | Path, rows: list[dict], dataset_type: dict,
                   task_type: str = "InstructTextTask", kl_coef: float = 0.0) -> float:
    """The task's metric; with kl_coef > 0 on Instruct/Chat the KL-weighted score the validator
    computes when it runs the evaluation with USE_KL=1 and KL_COEF=kl_coef."""
    if task_type not in METRICS:
        raise ValueError(f"no evaluator for task type {task_type!r} (have: {sorted(METRICS)})")
    if kl_coef and task_type in KL_WEIGHTED:
        loss, kl = kl_weighted_terms(model, str(base_model), rows, dataset_type, task_type)
        return loss + kl_coef * kl
    return METRICS[task_type](model, str(base_model), rows, dataset_type)


def evaluate_path(model_path: str | Path, base_model: str | Path, test_file: str | Path, dataset_type: dict,
                  task_type: str = "InstructTextTask", kl_coef: float = 0.0) -> float:
    """The validator metric of a model folder (full or adapter) on a test file, with the base
    model's tokenizer (and, for DPO and KL-weighted tasks, the base model as reference)."""
    rows = json.loads(Path(test_file).read_text())
    return evaluate_model(load_submission(model_path), base_model, rows, dataset_type, task_type, kl_coef)
