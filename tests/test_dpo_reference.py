"""Full-fine-tune DPO computes reference log-probs before the first step: no more than the
deadline lets it train (trainers/dpo.py precompute_for_full)."""
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.config import TrainConfig
from trainers.dpo import precompute_for_full
from trainers.dpo_format import PairExample


def _pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, 60, (k,), generator=g).tolist()  # noqa: E731
    return [PairExample(ids(6), ids(4), ids(5)) for _ in range(n)]


def test_full_fine_tune_references_stop_at_the_deadline():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
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
