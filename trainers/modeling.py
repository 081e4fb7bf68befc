"""Loading the base model, its tokenizer and a submission (full or adapter), attaching the
trainable part, saving it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import TrainConfig


def load_tokenizer(model_path: str):
    """The base tokenizer, as the validator loads it: pad = eos when there is no pad token."""
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


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


def load_base_model(model_path: str, device: torch.device, onto_device: bool = False):
    """The base model in `device`'s training dtype, left on the CPU: the caller moves it (after
    wrapping it for training; under ZeRO-3 it is already partitioned and must not be moved).
    `onto_device` (a GPU, no ZeRO-3): the weights go from the safetensors straight onto the GPU,
    without a whole CPU copy first (an 8B model: 16 GB less host memory, one copy less)."""
    # bf16 weights on GPU (as evaluated); fp32 on CPU, where bf16 matmuls are slow.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if onto_device and device.type == "cuda":
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=str(device))
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)


def wrap_for_training(model, cfg: TrainConfig, ranks: dict[str, int] | None = None):
    """The model with its trainable part: all of it, its last layers, or a LoRA adapter.
    `ranks`: a per-layer peft rank_pattern (layerwise.probe_rank_pattern) instead of the
    per-module one from `lora_mlp_r`."""
    if cfg.method == "full":
        return model
    if cfg.method == "last_layers":
        from .layerwise import freeze_all_but_last

        return freeze_all_but_last(model, cfg.last_layers)
    if cfg.method != "lora":
        raise ValueError(f"unknown method {cfg.method!r}")
    from peft import LoraConfig, get_peft_model

    # per-module rank: peft matches these keys as regexes on the module names' tails
    mlp = {r"mlp\..*": cfg.lora_mlp_r} if cfg.lora_mlp_r and cfg.lora_mlp_r != cfg.lora_r else {}
    pattern = ranks or mlp
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, task_type="CAUSAL_LM",
                      use_rslora=cfg.lora_rslora, use_dora=cfg.lora_dora, rank_pattern=pattern,
                      alpha_pattern={k: cfg.lora_alpha * r / cfg.lora_r for k, r in pattern.items()})
    return get_peft_model(model, lora)


def save_trainable(model, tokenizer, out_dir: str) -> None:
    """A LoRA adapter (adapter_config.json + adapter_model.safetensors) or a full model with
    its config unchanged; tokenizer files ride along (the validator ignores them)."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
