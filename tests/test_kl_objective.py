"""KL-weighted Instruct (G.O.D evaluators/instruct_text.py with USE_KL=1): the score is eval_loss +
KL_COEF x the mean per-token KL(finetuned || base) over the positions whose label is set (the mask
is not shifted), token-weighted over the whole set. Our evaluator, the training loop's dev metric
(full FT against a frozen copy, LoRA with its adapter switched off) and the training objective."""
import copy

import pytest
import torch
import torch.nn.functional as F

from trainers.config import TrainConfig
from trainers.evaluate import evaluate_model, kl_weighted_terms
from trainers.formats import tokenize_rows
from trainers.instruct import SFT, Steps
from trainers.instruct_format import IGNORE
from trainers.modeling import load_base_model, load_tokenizer

COEF = 0.7


def _direct_score(model, base, examples, coef):
    """Written from the validator's code: HF loss per sample (batch size 1), then the KL loop."""
    losses, kl_total, kl_count = [], 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
            out = model(input_ids=ids, labels=labels)
            losses.append(float(out.loss))
            logp = F.log_softmax(out.logits.float(), dim=-1)
            logq = F.log_softmax(base(input_ids=ids).logits.float(), dim=-1)
            kl_per_token = (logp.exp() * (logp - logq)).sum(dim=-1)
            mask = (labels != IGNORE).float()
            kl_total += float((kl_per_token * mask).sum())
            kl_count += int(mask.sum())
    eval_loss = sum(losses) / len(losses)
    return eval_loss + coef * kl_total / kl_count, eval_loss, kl_total / kl_count


def _perturbed(model, scale=0.05, seed=0):
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return tuned


@pytest.fixture(scope="module")
def setup(tiny_models, demo_task):
    path = tiny_models["qwen2"]
    base = load_base_model(str(path), torch.device("cpu")).float().eval()
    rows = demo_task["test"][:12]
    examples, _ = tokenize_rows("InstructTextTask", rows, demo_task["dataset_type"], load_tokenizer(str(path)), 512)
    return path, base, rows, examples


def test_the_kl_weighted_metric_equals_the_validators_computation(setup, demo_task):
    path, base, rows, examples = setup
    tuned = _perturbed(base)
    want, want_loss, want_kl = _direct_score(tuned, base, examples, COEF)
    loss, kl = kl_weighted_terms(tuned, str(path), rows, demo_task["dataset_type"], base=base)
    assert loss == pytest.approx(want_loss, rel=1e-4) and kl == pytest.approx(want_kl, rel=1e-4) and kl > 0
    assert evaluate_model(tuned, str(path), rows, demo_task["dataset_type"], kl_coef=COEF) == pytest.approx(want, rel=1e-4)
    assert evaluate_model(base, str(path), rows, demo_task["dataset_type"], kl_coef=COEF) == \
        pytest.approx(_direct_score(base, base, examples, 0.0)[0], rel=1e-4)  # the base has no KL


def _dev_metric(module_model, examples, path, method, reference=None):
    cfg = TrainConfig(model_path=str(path), train_file="", dataset_type={}, method=method, kl_coef=COEF,
                      batch_tokens=256, max_batch=4)
    steps = Steps(SFT, module_model, cfg, torch.device("cpu"), load_tokenizer(str(path)).pad_token_id,
                  max(len(e) for e in examples), reference)
    return float(steps.dev_loss(examples))


def test_the_training_dev_metric_is_the_same_score_for_full_ft_and_lora(setup):
    path, base, rows, examples = setup
    tuned = _perturbed(base)
    want = _direct_score(tuned, base, examples, COEF)[0]
    assert _dev_metric(tuned, examples, path, "full", reference=base) == pytest.approx(want, rel=1e-4)

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False))  # a non-zero adapter
    with torch.no_grad():
        with lora.disable_adapter():
            assert torch.equal(lora(input_ids=torch.tensor([examples[0].input_ids])).logits,
                               base(input_ids=torch.tensor([examples[0].input_ids])).logits)
    want = _direct_score(lora, base, examples, COEF)[0]
    assert _dev_metric(lora, examples, path, "lora") == pytest.approx(want, rel=1e-4)


def test_kl_aware_training_moves_less_from_the_base_than_plain_training(setup, demo_task):
    """The same LoRA steps (same seed, same batches) through the training loop's loss module, with
    and without the KL term: the KL-aware adapter ends closer to the base (what the weighted score
    pays for). Without the term taking effect the two runs would be identical. Plain SGD: Adam
    normalises each step's size, and with it 3 of 48 random bases ended the other way round (the KL
    gradient is zero at the base and grows with the distance, which SGD keeps; 0 of 112 with SGD,
    KL ratio at most 0.69)."""
    from peft import LoraConfig, get_peft_model

    from trainers.evaluate import mean_kl_to_base

    path, base, _, held_out = setup
    pad = load_tokenizer(str(path)).pad_token_id
    train, _ = tokenize_rows("InstructTextTask", demo_task["train"][:64], demo_task["dataset_type"],
                             load_tokenizer(str(path)), 512)
    result = {}
    for coef in (0.0, 2.0):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        cfg = TrainConfig(model_path=str(path), train_file="", dataset_type={}, kl_coef=coef, batch_tokens=512,
                          max_batch=8)
        steps = Steps(SFT, model, cfg, torch.device("cpu"), pad, max(len(e) for e in train))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.2)
        for batch in steps.batches(train, seed=0)[:8]:
            steps.mean_loss(steps.module, batch).backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        result[coef] = mean_kl_to_base(model, base, held_out)
    assert 0 < result[2.0] < result[0.0], result
