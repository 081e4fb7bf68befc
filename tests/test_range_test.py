"""The LR range test: weights restored, a curve that diverges at absurd LRs, a suggestion below
the divergence, and its files next to the job's outputs (no Ray)."""
import json

import pytest
import torch
from conftest import BENCH

from trainers.config import TrainConfig
from tuning.priors import refine_lr_prior
from tuning.range_test import RangeTestConfig, RangeTestResult, lr_range_test, run_range_test, suggest, sweep_lrs
from tuning.search import inconclusive


@pytest.fixture(scope="module")
def small_model(request):
    """pico-llama when the bench is there (no need to build the tiny families), else a tiny one."""
    pico = BENCH / "models" / "pico-llama"
    return pico if (pico / "config.json").exists() else request.getfixturevalue("base_model")


def test_suggestion_is_a_decade_below_the_minimum_of_the_smoothed_curve():
    lrs = sweep_lrs(1e-5, 1e-1, 9)
    curve = [5.0, 4.9, 4.5, 3.5, 2.5, 2.0, 2.6, 9.0, 50.0]  # minimum at lrs[5] = 1e-2.5
    suggestion, candidates = suggest(lrs, curve)
    assert abs(suggestion - lrs[5] / 10) < 1e-12
    assert candidates["steepest"] in lrs[2:5]


def _result(curve: list[float], stopped_by: str) -> RangeTestResult:
    lrs = sweep_lrs(1e-5, 1e-1, len(curve)) if len(curve) > 1 else [7e-6]
    suggestion, candidates = suggest(lrs, curve)
    lr_at_min = lrs[curve.index(min(curve))]
    return RangeTestResult(lrs, curve, curve, suggestion, "min_over_10", candidates, lr_at_min, None, 1.0, stopped_by)


def test_a_curve_too_short_or_cut_while_falling_does_not_place_the_lr():
    # what a busy machine produced in a 10-minute job: one LR, then the time share was over
    assert "1 LRs tried" in inconclusive(_result([8.6], "time"))
    falling = [5.0, 4.8, 4.5, 4.1, 3.8, 3.2, 2.9, 2.5, 2.2]
    assert "still falling" in inconclusive(_result(falling, "time"))
    assert inconclusive(_result(falling, "end")) is None           # the sweep ended: the top LR is the best seen
    assert inconclusive(_result([5.0, 4.9, 4.5, 3.5, 2.5, 2.0, 2.6, 9.0, 50.0], "time")) is None


def test_range_test_writes_the_curve_and_suggests_below_divergence(tmp_path, small_model, demo_task):
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(demo_task["train"][:200]))
    cfg = TrainConfig(model_path=str(small_model), train_file=str(train_file), dataset_type=demo_task["dataset_type"],
                      method="full", batch_tokens=1024, max_batch=8)
    result = run_range_test(cfg, tmp_path / "job", prior_lr=1e-3,
                            rt=RangeTestConfig(steps=18, span_decades=2.5, cached_batches=3))
    assert result.stopped_by == "diverged" and result.diverged_at > result.lr_at_min  # 0.3 is absurd
    assert min(result.smoothed) < result.smoothed[0]            # the sweep trained before diverging
    assert result.lrs[0] < result.suggestion < result.lr_at_min
    saved = json.loads((tmp_path / "job" / "range_test.json").read_text())
    assert saved["suggestion"] == result.suggestion and len(saved["losses"]) == len(result.lrs)
    assert (tmp_path / "job" / "range_test.png").stat().st_size > 1000


def test_lr_range_test_leaves_the_model_as_it_found_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))

    class Wrap(torch.nn.Module):  # the HF call shape: model(input_ids=..., attention_mask=...).logits
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.m(input_ids)})()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 50, (4, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    result = lr_range_test(Wrap(), [batch], sweep_lrs(1e-4, 10.0, 30))
    assert result.losses[0] != result.losses[min(5, len(result.losses) - 1)]  # it did train
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_knowledge_base_pulls_the_prior_towards_winning_lrs():
    assert refine_lr_prior(1e-4, None) == 1e-4 and refine_lr_prior(1e-4, [float("nan"), -1]) == 1e-4
    one = refine_lr_prior(1e-4, [1e-3])
    many = refine_lr_prior(1e-4, [1e-3] * 8)
    assert 1e-4 < one < many < 1e-3                               # partway, more with a consistent record
    assert abs(one - (1e-4 * 1e-3) ** 0.5) < 1e-12                 # one win = one prior-equivalent
