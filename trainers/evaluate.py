"""The validator's Instruct metric, computed our way on any submission: mean over samples of
the per-sample mean cross-entropy on output + EOS, with the base tokenizer, dropping samples
longer than the evaluation length. Loads a full model or a PEFT adapter."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .batching import collate, make_batches, per_sample_loss
from .instruct_format import eval_sequence_length, tokenize_rows
from .modeling import load_tokenizer


def load_submission(path: str | Path):
    """A submission folder as the validator loads it: PEFT when adapter_config.json is there
    (base from its base_model_name_or_path), else a full model."""
    path = Path(path)
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.exists():
        from peft import PeftModel

        base_id = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(base_id, dtype=torch.float32)
        return PeftModel.from_pretrained(base, str(path), is_trainable=False)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


@torch.no_grad()
def instruct_loss(model, tokenizer_path: str, rows: list[dict], dataset_type: dict,
                  batch_tokens: int = 16384) -> float:
    tokenizer = load_tokenizer(tokenizer_path)
    max_len = eval_sequence_length(getattr(model.config, "max_position_embeddings", None))
    examples, _ = tokenize_rows(rows, dataset_type, tokenizer, max_len)
    model.eval()
    device = next(model.parameters()).device
    losses: list[float] = []
    for batch in make_batches(examples, batch_tokens, 32, seed=0):
        inputs = collate(batch, tokenizer.pad_token_id, device)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        losses.extend(per_sample_loss(logits, inputs["labels"]).tolist())
    return sum(losses) / len(losses)


def evaluate_path(model_path: str | Path, base_model: str, test_file: str | Path, dataset_type: dict) -> float:
    """Loss of a model folder (full or adapter) on a test file, with the base model's tokenizer."""
    rows = json.loads(Path(test_file).read_text())
    model = load_submission(model_path)
    return instruct_loss(model, base_model, rows, dataset_type)
