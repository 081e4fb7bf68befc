"""The demo's base model: ../shared/bench/models/pico-llama when present (a small pretrained
model), else a tiny Llama built locally from a config with a BPE tokenizer trained on the
demo task's text. Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

from cluster.settings import env

BENCH_MODEL = Path(__file__).resolve().parents[2].parent / "shared" / "bench" / "models" / "pico-llama"


def demo_model(state_dir: Path, task_dir: Path) -> Path:
    override = env("MINER_DEMO_MODEL")
    if override:
        return Path(override)
    if (BENCH_MODEL / "config.json").exists():
        return BENCH_MODEL
    out = state_dir / "demo-model"
    if not (out / "config.json").exists():
        build_tiny_model(out, texts_from_task(task_dir))
    return out


def texts_from_task(task_dir: Path) -> list[str]:
    rows = json.loads((task_dir / "train.json").read_text())
    return [" ".join(str(v) for v in row.values()) for row in rows]


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=2048)
_FAMILY_SHAPES = {
    # hidden 128, 4 layers, GQA where the family has it: enough to exercise each architecture.
    "llama": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
    "mistral": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=4096, sliding_window=None),
    "gpt2": dict(n_embd=128, n_layer=2, n_head=4, n_positions=1024),
    # The other families: hidden 64, 2 layers (a few hundred K parameters), enough to run each
    # architecture's own attention/MLP/norm code through training, saving and loading.
    "qwen3": dict(_SMALL, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "gemma": dict(_SMALL, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(_SMALL, num_key_value_heads=2, head_dim=16, sliding_window=64, query_pre_attn_scalar=16),
    "phi3": dict(_SMALL, num_key_value_heads=2, original_max_position_embeddings=2048),
    "gpt_neox": dict(_SMALL, rotary_pct=0.25),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=2048, word_embed_proj_dim=64),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                   num_kv_heads=2, max_position_embeddings=2048),
}
FAMILIES = tuple(_FAMILY_SHAPES)


def build_tiny_model(out: Path, texts: list[str], family: str = "llama", vocab_size: int = 2048,
                     bos_prefix: bool = False, seed: int = 0) -> Path:
    """A randomly initialised model of `family` and a byte-level BPE tokenizer trained on
    `texts`, saved in HF format. `bos_prefix` makes the tokenizer add a BOS to every encoding
    (as Llama-3 tokenizers do), which the instruct formatting must handle. The weights come from
    `seed` (not the caller's RNG state), so a test suite sees the same models in any order."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|begin|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = "<|endoftext|>"
    if bos_prefix:
        bos = "<|begin|>"
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    ids = dict(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    config = AutoConfig.for_model(family, vocab_size=len(fast), **_FAMILY_SHAPES[family], **ids)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
