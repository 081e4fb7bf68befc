"""Full-fine-tune DPO computes reference log-probs before the first step: no more than the
deadline lets it train (trainers/dpo.py precompute_for_full). Pairs are no longer capped at
512/1024 tokens: a long one is a micro-batch of its own, and one that runs out of memory is cut
by the OOM ladder, its reference recomputed (LoRA)."""
import math
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.batching import make_batches
from trainers.config import TrainConfig
from trainers.dpo import DPO, dpo_per_sample, precompute_for_full
from trainers.dpo_format import PairExample
from trainers.oom import OomLadder


def _pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, 60, (k,), generator=g).tolist()  # noqa: E731
    return [PairExample(ids(6), ids(4), ids(5)) for _ in range(n)]


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


def test_full_fine_tune_references_stop_at_the_deadline():
    model = _model()
    cfg = dict(model_path="-", train_file="-", dataset_type={}, method="full", max_batch=4)
    train, dev = _pairs(24, 0), _pairs(6, 1)
    late = TrainConfig(**cfg, train_deadline=time.time() - 1.0)              # no time left to train
    kept = precompute_for_full(model, late, train, dev, 0, torch.device("cpu"))
    assert all(ex.ref is not None for ex in dev)                              # the dev metric needs all
    assert len(kept) == 4 and all(ex.ref is not None for ex in kept)          # one batch only
    assert sum(ex.ref is None for ex in train) == 20
    kept = precompute_for_full(model, TrainConfig(**cfg), train, dev, 0, torch.device("cpu"))  # no deadline
    assert kept == train and all(ex.ref is not None for ex in train)
    lora = TrainConfig(**{**cfg, "method": "lora"}, train_deadline=time.time() - 1.0)
    fresh = _pairs(8, 2)
    assert precompute_for_full(model, lora, fresh, [], 0, torch.device("cpu")) == fresh  # lazy: untouched
    assert all(ex.ref is None for ex in fresh)


def test_a_long_pair_trains_alone_and_is_cut_when_it_runs_out_of_memory():
    from peft import LoraConfig, get_peft_model

    cpu = torch.device("cpu")
    lora = get_peft_model(_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    ids = lambda k: torch.randint(3, 60, (k,), generator=g).tolist()  # noqa: E731
    long = PairExample(ids(300), ids(40), ids(30))
    pairs = _pairs(6, 3) + [long]
    assert [long] in make_batches(pairs, batch_tokens=64, max_batch=8, seed=0)  # over the budget: alone

    def step(piece, weight):  # a device whose memory holds 200 tokens of a pair
        if len(piece[0]) > 200:
            raise torch.OutOfMemoryError("simulated")
        loss = dpo_per_sample(lora, piece, 0, cpu).mean()
        (loss * weight).backward()
        return loss.item()

    ladder = OomLadder(DPO.cut, min_len=8, log=lambda *_: None)
    assert math.isfinite(ladder.run([long], step)) and ladder.max_len == 170  # 680 -> 340 -> 170 tokens
    cut = DPO.cut(long, 170)
    assert (cut.prompt, cut.chosen, cut.rejected) == (long.prompt[-45:], long.chosen, long.rejected[:40])
    assert long.ref is None  # the whole pair's reference is never mixed with a cut pair's log-probs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_" in n)

    full = _model()  # a full fine-tune has no base copy to recompute the cut pair's reference with
    with pytest.raises(RuntimeError, match="cut after running out of memory"):
        OomLadder(DPO.cut, min_len=8, log=lambda *_: None).run(
            [long], lambda piece, w: step(piece, w) if len(piece[0]) > 200 else dpo_per_sample(full, piece, 0, cpu))
