"""The packed layout (one row, position resets, attention confined by cu_seqlens) computes the
same per-token losses, the same micro-batch loss and the same gradients as the padded layout,
and both equal the validator's metric computed from full logits (per_sample_loss)."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from trainers.batching import per_sample_loss
from trainers.instruct_format import IGNORE, Example
from trainers.packing import CausalLMLoss, collate_packed, collate_padded, enable_packed_attention, pack_batches


def _tiny(family: str):
    kw = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = LlamaConfig(**kw) if family == "llama" else Qwen2Config(**kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def _examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length, prompt = rng.randint(3, 40), rng.randint(1, 20)
        ids = [rng.randrange(1, 384) for _ in range(length)]
        out.append(Example(ids, [IGNORE if t < prompt else x for t, x in enumerate(ids)]))
    out.append(Example([5, 6, 7], [IGNORE] * 3))  # a sample with no label token still counts
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_loss_equals_padded_loss(family):
    model = _tiny(family)
    examples = _examples(12, seed=hash(family) % 1000)
    cpu = torch.device("cpu")
    padded, packed = collate_padded(examples, 0, cpu), collate_packed(examples, cpu)
    assert packed["input_ids"].shape == (1, sum(len(e) for e in examples))  # no padding at all

    # reference: full logits of the plain HF padded forward, and the validator's metric
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    labels = torch.full_like(padded["input_ids"], IGNORE)
    for row, ex in enumerate(examples):
        labels[row, :len(ex)] = torch.tensor(ex.labels)
    reference = per_sample_loss(logits, labels).mean()
    ref_tokens = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
        reduction="none")[labels[:, 1:].reshape(-1) != IGNORE]

    loss_model = CausalLMLoss(model)
    pad_loss = loss_model(**padded)
    pad_loss.backward()
    pad_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    enable_packed_attention(model)
    tok_packed = loss_model.token_losses(**packed)
    pack_loss = loss_model(**packed)
    pack_loss.backward()

    assert torch.allclose(tok_packed, ref_tokens, atol=1e-4, rtol=1e-4)
    assert torch.allclose(pad_loss, reference, atol=1e-5) and torch.allclose(pack_loss, reference, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, pad_grads[name], atol=1e-5, rtol=1e-3), name


def test_packed_attention_does_not_leak_across_examples():
    model = _tiny("llama")
    enable_packed_attention(model)
    loss_model = CausalLMLoss(model)
    a = Example(list(range(10, 30)), [IGNORE] * 5 + list(range(15, 30)))
    b = Example(list(range(100, 125)), [IGNORE] * 25)
    alone = loss_model.token_losses(**collate_packed([a], torch.device("cpu")))
    after_b = loss_model.token_losses(**collate_packed([b, a], torch.device("cpu")))
    assert alone.numel() > 0
    assert torch.allclose(after_b[-alone.numel():], alone, atol=1e-5)  # positions restart, no cross-attention
    model.set_attn_implementation("sdpa")  # control: plain causal attention over the row does leak
    leaky = CausalLMLoss(model).token_losses(input_ids=collate_packed([b, a], torch.device("cpu"))["input_ids"],
                                             **{k: v for k, v in collate_packed([b, a], torch.device("cpu")).items()
                                                if k.startswith("label_")})
    assert not torch.allclose(leaky[-alone.numel():], alone, atol=1e-3)


def test_pack_batches_keeps_every_example_once_within_capacity():
    examples = _examples(300, seed=3)
    packs = pack_batches(examples, capacity=200, seed=7)
    assert sorted(id(e) for p in packs for e in p) == sorted(id(e) for e in examples)
    assert all(sum(len(e) for e in p) <= 200 for p in packs)
    fill = sum(len(e) for e in examples) / (200 * len(packs))
    assert fill > 0.85
    assert [len(p) for p in pack_batches(examples, 200, seed=7)] == [len(p) for p in packs]
