"""The validator's GRPO metric, computed our way (G.O.D validator/evaluation/eval_grpo.py, HEAD).

What the validator does per submission: the task's prompt column becomes `prompt` (and
`extra_column` becomes `extra_data`), the raw prompt string is tokenised as-is (no chat template,
the base tokenizer), TRL samples `num_generations=2` completions per prompt (temperature 1), and
each reward function is averaged over all completions; the weighted sum of those means is the
reward. HEAD then normalises each function's mean across the task's miners and subtracts
BETA_GRPO (0.5) x KL(base || tuned), the token-averaged KL on the prompt tokens.

For a single model the cross-miner normalisation is not defined, so our score is
`sum_f w_f * mean_f - 0.5 * KL`: monotone in every term the validator ranks on, and equal to the
validator's formula up to its per-function rescaling. Reward calls go through the sandbox with the
validator's calling convention: functions taking `extra_data` get the batch kwargs (prompts,
dataset columns), the others only the completions.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .reward_sandbox import RewardSandbox, SandboxLimits

BETA_GRPO = 0.5                 # validator/core/constants.py (HEAD); 0.04 in the 2025-07 snapshot
NUM_GENERATIONS = 2             # GRPO_DEFAULT_NUM_GENERATIONS
EVAL_MAX_COMPLETION = 256       # TRL's max_completion_length default in the validator's image
KL_SEQUENCE_LENGTH = 512        # GRPO_KL_SEQUENCE_LENGTH, halved for short-context models


def grpo_rows(rows: list[dict], dataset_type: dict) -> list[dict]:
    """Rows as the validator hands them to TRL: `field_prompt` -> prompt, `extra_column` ->
    extra_data, other columns kept (TRL passes them to reward functions)."""
    rename = {dataset_type.get("field_prompt") or "prompt": "prompt"}
    if dataset_type.get("extra_column"):
        rename[dataset_type["extra_column"]] = "extra_data"
    out = []
    for row in rows:
        new = {rename.get(k, k): v for k, v in row.items()}
        if not isinstance(new.get("prompt"), str) or not new["prompt"].strip():
            continue  # a row without a prompt cannot be generated from
        out.append(new)
    return out


def reward_sources(dataset_type: dict) -> tuple[list[str], list[float]]:
    funcs = dataset_type.get("reward_functions") or []
    return [f["reward_func"] for f in funcs], [float(f["reward_weight"]) for f in funcs]


def reward_kwargs(box: RewardSandbox, fn: int, rows: list[dict], completions: list[str]) -> dict:
    """The validator passes TRL's kwargs only to functions that take extra_data (and only when the
    task has an extra column); JSON-able ones here: prompts and the dataset columns."""
    if not (box.reports[fn].supports_extra_data and rows and "extra_data" in rows[0]):
        return {}
    kwargs = {"prompts": [r["prompt"] for r in rows]}
    for key in rows[0]:
        if key not in ("prompt", "completion", "completion_ids"):
            kwargs[key] = [r.get(key) for r in rows]
    return kwargs


@dataclass
class GrpoScore:
    score: float                 # weighted reward - beta * KL: higher is better
    reward: float                # sum_f w_f * mean_f
    kl: float
    per_function: dict           # name -> raw mean
    completions: int
    reward_failures: dict


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], num_generations: int, max_new_tokens: int,
                       seed: int, batch_prompts: int = 64) -> list[str]:
    """num_generations sampled completions per prompt, grouped per prompt (TRL's order)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[str] = []
    for i in range(0, len(prompts), batch_prompts):
        chunk = prompts[i:i + batch_prompts]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left").to(device)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        ids = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, num_return_sequences=num_generations,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.extend(tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    if was_training:
        model.train()
    return out


@torch.no_grad()
def prompt_kl(base, tuned, tokenizer, prompts: list[str]) -> float:
    """KL(base || tuned) per token on the prompt, averaged over prompts, one prompt at a time
    (the validator's calculate_kl_divergence at batch size 1). `base is tuned` for a PEFT model."""
    if base is None:
        return 0.0
    max_len = KL_SEQUENCE_LENGTH
    max_pos = getattr(tuned.config, "max_position_embeddings", None)
    if max_pos and max_pos < 2 * max_len:
        max_len = math.ceil(max_pos / 2)
    device = next(tuned.parameters()).device
    was_training = tuned.training
    tuned.eval()
    total = 0.0
    for p in prompts:
        enc = tokenizer([p], return_tensors="pt", truncation=True, max_length=max_len).to(device)
        if base is tuned:  # a PEFT model: the reference is the same model with its adapter off
            with tuned.disable_adapter():
                ref_logp = torch.log_softmax(tuned(**enc).logits.float(), dim=-1)
        else:
            ref_logp = torch.log_softmax(base(**enc).logits.float(), dim=-1)
        new_logp = torch.log_softmax(tuned(**enc).logits.float(), dim=-1)
        total += (ref_logp.exp() * (ref_logp - new_logp)).sum(-1).mean().item()
    if was_training:
        tuned.train()
    return total / max(1, len(prompts))


def grpo_score(model, tokenizer, rows: list[dict], box: RewardSandbox, weights: list[float], base=None,
               max_new_tokens: int = EVAL_MAX_COMPLETION, seed: int = 0, beta: float = BETA_GRPO) -> GrpoScore:
    """The metric on already-adapted rows (grpo_rows) with a started sandbox. `base` is the
    reference for the KL term (None: a base model scoring itself, KL = 0)."""
    prompts = [r["prompt"] for r in rows]
    completions = sample_completions(model, tokenizer, prompts, NUM_GENERATIONS, max_new_tokens, seed)
    expanded = [r for r in rows for _ in range(NUM_GENERATIONS)]
    per_function, reward = {}, 0.0
    for fn, report in enumerate(box.reports):
        if not report.ok:
            continue
        values = []
        for i in range(0, len(completions), 64):
            batch_rows, batch = expanded[i:i + 64], completions[i:i + 64]
            values += box.call(fn, batch, reward_kwargs(box, fn, batch_rows, batch))
        mean = sum(values) / max(1, len(values))
        per_function[f"{report.name}#{fn}"] = mean
        reward += weights[fn] * mean
    kl = prompt_kl(base, model, tokenizer, prompts) if base is not None else 0.0
    return GrpoScore(reward - beta * kl, reward, kl, per_function, len(completions),
                     box.failure_summary()["failed_samples"])


def evaluate_grpo_path(model_path: str | Path, base_model: str, test_file: str | Path, dataset_type: dict,
                       max_new_tokens: int = EVAL_MAX_COMPLETION, max_rows: int | None = None, seed: int = 0,
                       limits: SandboxLimits | None = None) -> GrpoScore:
    """The metric for a submission folder (full model or PEFT adapter) on a test file, with the
    base model's tokenizer and the base model as the KL reference."""
    from transformers import AutoModelForCausalLM

    from .modeling import load_submission

    rows = json.loads(Path(test_file).read_text())
    is_base = Path(model_path).resolve() == Path(base_model).resolve()
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32) if is_base else load_submission(model_path)
    return score_model(model, base_model, rows, dataset_type, max_new_tokens, seed, limits, max_rows)


def score_model(model, base_model: str, rows: list[dict], dataset_type: dict,
                max_new_tokens: int = EVAL_MAX_COMPLETION, seed: int = 0,
                limits: SandboxLimits | None = None, max_rows: int | None = None) -> GrpoScore:
    """A loaded model's GRPO score: rewards in the sandbox, KL against the base (none when the
    model is the base itself; an adapter's base is the adapter switched off)."""
    from transformers import AutoModelForCausalLM

    from .modeling import load_tokenizer

    rows = grpo_rows(rows, dataset_type)[:max_rows]
    if hasattr(model, "disable_adapter"):
        base = model
    elif Path(str(getattr(model, "name_or_path", ""))).resolve() == Path(base_model).resolve():
        base = None
    else:
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).to(next(model.parameters()).device)
    sources, weights = reward_sources(dataset_type)
    with RewardSandbox(sources, limits, sample_rows=rows[:10]) as box:
        return grpo_score(model, load_tokenizer(base_model), rows, box, weights, base, max_new_tokens, seed)
