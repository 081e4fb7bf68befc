"""The fused DPO step (dpo_packed.py, fused_loss.linear_dpo) computes the same per-pair losses and
the same gradients as the plain per-pair recipe (dpo.dpo_per_sample: padded batch, full logits),
in the padded and in the packed layout, with groups of whole pairs and pairs larger than a chunk;
with LoRA it fills missing reference log-probs as the adapter-off forward does."""
import copy
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from trainers.dpo import dpo_per_sample, fill_reference
from trainers.dpo_format import PairExample
from trainers.dpo_packed import NO_BASE_COPY, PairLoss, PairPlan
from trainers.fused_loss import pair_groups
from trainers.packing import enable_packed_attention

CPU = torch.device("cpu")


def _tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def _pairs(seed: int) -> list[PairExample]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(1, 384) for _ in range(k)]  # noqa: E731
    pairs = [PairExample(ids(rng.randint(1, 20)), ids(rng.randint(1, 12)), ids(rng.randint(1, 12))) for _ in range(7)]
    pairs.append(PairExample([], ids(5), ids(3)))        # no prompt: the first completion token is not scored
    pairs.append(PairExample(ids(4), ids(30), ids(25)))   # larger than the test's chunk: logits made twice
    same = ids(6)
    pairs.append(PairExample(ids(3), same, list(same)))  # chosen == rejected: margin = the references' only
    return pairs


def _with_reference(pairs, model):
    fill_reference(model, pairs, 0, CPU)
    for ex in pairs:  # a reference other than the policy itself, so that margins are not all 0
        ex.ref = (ex.ref[0] + 0.3, ex.ref[1] - 0.2)
    return pairs


def _plain(model, pairs):
    """Per-pair losses and gradients of the unfused recipe."""
    model.zero_grad()
    losses = dpo_per_sample(model, pairs, 0, CPU)
    losses.mean().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_fused_pair_loss_equals_the_plain_recipe(packed):
    model = _tiny()
    pairs = _with_reference(_pairs(1), model)
    want, want_grads = _plain(model, pairs)
    model.zero_grad()
    if packed:
        enable_packed_attention(model)  # on CPU: the reference varlen attention, one SDPA call per sequence
    loss = PairLoss(model, chunk=24)
    plan = PairPlan(packed=packed, batch_tokens=10_000, max_batch=64)
    collated = plan.collate(pairs, 0, CPU)
    if packed:
        assert collated["input_ids"].shape[0] == 1  # one row, no padding
    assert len(pair_groups(collated["pair_rows"], 24)) > 2
    got = loss(return_losses=True, **collated)
    assert torch.allclose(got, want, atol=1e-5)
    assert got[-1].item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(-0.05)).item(), abs=1e-5)
    loss(**collated).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[name], atol=1e-6, rtol=1e-3), name


def test_pair_groups_keep_pairs_whole():
    assert pair_groups([3, 4, 2, 10, 0, 1], chunk=8) == [(0, 7, 0, 2), (7, 9, 2, 3), (9, 19, 3, 4), (19, 20, 4, 6)]
    assert pair_groups([], chunk=8) == []


def test_lora_fills_missing_references_with_the_adapter_off():
    base = _tiny()
    pairs = _pairs(2)
    want = copy.deepcopy(pairs)
    fill_reference(base, want, 0, CPU)  # the base model itself
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pairs[0].ref = (-1.0, -2.0)  # a pair that has one keeps it
    PairLoss(model)(**PairPlan(packed=False, batch_tokens=10_000, max_batch=64).collate(pairs, 0, CPU))
    assert pairs[0].ref == (-1.0, -2.0)
    for ex, w in zip(pairs[1:], want[1:]):
        assert ex.ref == pytest.approx(w.ref, abs=1e-4)
    assert model.training


def test_full_fine_tune_without_references_fails_clearly():
    collated = PairPlan(packed=False, batch_tokens=10_000, max_batch=64).collate(_pairs(3), 0, CPU)
    with pytest.raises(RuntimeError, match="keeps no base model"):
        PairLoss(_tiny())(**collated)
    assert "keeps no base model" in NO_BASE_COPY


def test_packed_pairs_per_micro_batch_stay_within_max_batch():
    pairs = _pairs(4) * 5
    packs = PairPlan(packed=True, batch_tokens=100_000, max_batch=8).batches(pairs, seed=0)
    assert [len(p) for p in packs] == [8] * 6 + [2]  # 50 pairs
    assert sorted(map(id, (ex for p in packs for ex in p))) == sorted(map(id, pairs))


def test_full_fine_tune_references_come_from_the_path_that_trains():
    from trainers.config import TrainConfig
    from trainers.dpo import precompute_for_full
    model = _tiny()
    train, dev = _pairs(5), _pairs(6)
    cfg = TrainConfig(model_path="-", train_file="-", dataset_type={}, method="full", max_batch=4)
    assert precompute_for_full(model, cfg, train, dev, 0, CPU) == train
    collated = PairPlan(packed=False, batch_tokens=10_000, max_batch=64).collate(train + dev, 0, CPU)
    losses = PairLoss(model)(return_losses=True, **collated)  # every reference is there: none computed
    assert torch.allclose(losses, torch.full_like(losses, 0.693147), atol=1e-6)  # the untrained policy: ln 2


def test_label_smoothing_steps_the_smoothed_loss_and_reports_the_plain_one():
    """cDPO: the gradient is that of (1-e) L(m) + e L(-m) (the swapped pair's loss), computed from
    full logits; the values returned stay the validator's plain per-pair losses."""
    from trainers.dpo_format import dpo_loss, sequence_logps

    model, e = _tiny(), 0.2
    pairs = _with_reference(_pairs(2), model)
    model.zero_grad()
    policy = sequence_logps(model, pairs, 0, CPU)
    reference = torch.tensor([ex.ref for ex in pairs]).T
    plain = dpo_loss(policy, reference)
    ((1 - e) * plain + e * dpo_loss(policy.flip(0), reference.flip(0))).mean().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, plan = PairLoss(model, chunk=24, smoothing=e), PairPlan(packed=False, batch_tokens=10_000, max_batch=64)
    collated = plan.collate(pairs, 0, CPU)
    assert torch.allclose(loss(return_losses=True, **collated), plain.detach(), atol=1e-5)
    mean = loss(**collated)
    assert mean.item() == pytest.approx(plain.mean().item(), abs=1e-5)
    mean.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[name], atol=1e-6, rtol=1e-3), name
