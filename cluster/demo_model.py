"""The demo's base model: ../shared/bench/models/pico-llama when present (a small pretrained
model), else a tiny Llama built locally from a config with a BPE tokenizer trained on the
demo task's text. Nothing is downloaded."""
from __future__ import annotations

import json
import os
from pathlib import Path

BENCH_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "models" / "pico-llama"


def demo_model(state_dir: Path, task_dir: Path) -> Path:
    override = os.environ.get("MINER_DEMO_MODEL")
    if override:
        return Path(override)
    if (BENCH_MODEL / "config.json").exists():
        return BENCH_MODEL
    out = state_dir / "demo-model"
    if not (out / "config.json").exists():
        build_tiny_llama(out, texts_from_task(task_dir))
    return out


def texts_from_task(task_dir: Path) -> list[str]:
    rows = json.loads((task_dir / "train.json").read_text())
    return [" ".join(str(v) for v in row.values()) for row in rows]


def build_tiny_llama(out: Path, texts: list[str], vocab_size: int = 2048) -> Path:
    """A randomly initialised 4-layer Llama and a byte-level BPE tokenizer, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out
