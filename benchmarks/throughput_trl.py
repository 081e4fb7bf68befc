"""TRL's best SFT configuration on the throughput benchmark's sample stream (benchmarks/throughput.py).

What a miner who cares about speed would run instead of our fast path: `trl.SFTTrainer` with
packing (best-fit decreasing, padding-free: one row per step, position ids reset per sample),
completion-only loss, bf16, the Trainer's fused AdamW, and optionally `use_liger_kernel=True`
(Liger's fused linear+CE, RMSNorm, RoPE and SwiGLU kernels) when the package is installed.
Attention: the host has no flash-attn package, so the padding-free row runs either through SDPA with
the block-diagonal mask transformers builds from the reset position ids, or through flex attention
(block-sparse, compiled); both variants are measured and the faster one is `trl_best`.

Variants (names as throughput.py's --variants takes them):
  trl_sdpa, trl_flex            SFTTrainer, packing, attention as named
  trl_sdpa_liger, trl_flex_liger  the same with use_liger_kernel=True
Each runs in its own process (Liger patches the model's modules in place; flex compiles them).
"""
from __future__ import annotations

import time

TRL_VARIANTS = ("trl_sdpa", "trl_flex", "trl_sdpa_liger", "trl_flex_liger")


def run_trl(model, samples, per_step: int, warm: int, timed: int, tmp: str, variant: str, device: str) -> dict:
    """Tokens/s of SFTTrainer on `samples`, packed into rows of the same real tokens per step as ours
    (max_length = the mean tokens of `per_step` samples, one row per optimizer step)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from benchmarks.throughput import step_clock
    from trainers.instruct_format import IGNORE
    from trainers.packing import hf_model_of
    attn = "flex_attention" if "flex" in variant else "sdpa"
    hf_model_of(model).set_attn_implementation(attn)
    tokens_per_step = sum(len(ex) for ex in samples) // (len(samples) // per_step)
    longest = max(len(ex) for ex in samples)
    data = Dataset.from_list([{"input_ids": ex.input_ids, "completion_mask": [int(x != IGNORE) for x in ex.labels]}
                              for ex in samples])
    counts, marks = [], []

    args = SFTConfig(output_dir=tmp, packing=True, packing_strategy="bfd", max_length=max(tokens_per_step, longest),
                     completion_only_loss=True, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                     max_steps=warm + timed, bf16=device == "cuda", use_cpu=device == "cpu", learning_rate=1e-5,
                     use_liger_kernel=variant.endswith("_liger"), save_strategy="no", report_to="none",
                     logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(), callbacks=[step_clock(marks)])
    collate = trainer.data_collator

    def counting(rows):  # real tokens of each packed row (padding-free: no pad but to a multiple, if any)
        batch = collate(rows)
        counts.append(sum(len(r["input_ids"]) for r in rows))
        return batch
    trainer.data_collator = counting
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    secs = marks[warm + timed - 1] - marks[warm - 1]
    real = sum(counts[warm:warm + timed])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"tokens_per_s": real / secs, "step_s": secs / timed, "peak_mem_gib": peak, "attn": attn,
            "liger": variant.endswith("_liger"), "pack_tokens": args.max_length, "rows": len(trainer.train_dataset),
            "first_step_s": marks[0] - t0, "optim": str(args.optim)}


def _tokenizer():
    """A two-token tokenizer: the stream is token ids already, SFTTrainer only needs pad/eos ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")
