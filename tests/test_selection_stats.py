"""The base guard (trainers/averaging.py): trained weights replace the starting ones in a
checkpoint only when they beat them on dev by more than `base_margin_se` standard errors of
the paired per-sample difference - a lower mean alone is not enough when it is noise."""
import math
import random

import torch

from trainers.averaging import DevMetric, Selection, clearly_better, paired_difference
from trainers.config import TrainConfig


def _metric(values):
    return DevMetric([(v, 1) for v in values])


def _cfg(**kw):
    return TrainConfig(model_path="-", train_file="-", dataset_type={}, **kw)


def test_paired_difference_is_the_textbook_one_and_cluster_robust_for_batch_means():
    base, cand = [0.7, 0.6, 0.9, 0.5], [0.6, 0.6, 0.7, 0.6]
    mean, se = paired_difference(_metric(cand), _metric(base))
    d = [c - b for c, b in zip(cand, base)]            # -0.1, 0, -0.2, 0.1
    sd = math.sqrt(sum((x - sum(d) / 4) ** 2 for x in d) / 3)
    assert math.isclose(mean, -0.05) and math.isclose(se, sd / 2)
    # two micro-batches of two (sums, counts): the cluster SE over batch-mean differences
    batched = paired_difference(DevMetric([(1.2, 2), (1.3, 2)]), DevMetric([(1.3, 2), (1.4, 2)]))
    assert math.isclose(batched[0], -0.05) and batched[1] < 1e-9
    assert float(DevMetric([(1.2, 2), (1.3, 2)])) == 0.625
    # not the same samples, or plain floats: no paired test
    assert paired_difference(_metric(cand[:3]), _metric(base)) is None
    assert paired_difference(0.5, 0.6) is None


def test_a_noise_lucky_mean_is_not_clearly_better_but_a_consistent_gain_is():
    rng = random.Random(0)
    base = [math.log(2)] * 256                          # DPO: every pair scores ln 2 at the start
    noise = [math.log(2) + rng.gauss(0, 0.05) for _ in range(256)]
    lucky = [x - (sum(noise) / 256 - math.log(2)) - 0.002 for x in noise]   # mean 0.002 below ln 2
    assert sum(lucky) / 256 < math.log(2)
    assert not clearly_better(_metric(lucky), _metric(base), k=2.0)
    assert clearly_better(_metric(lucky), _metric(base), k=0.0)           # the old rule: publishes noise
    gain = [x - 0.02 for x in lucky]                                       # ~6.5 standard errors
    assert clearly_better(_metric(gain), _metric(base), k=2.0)
    assert clearly_better(0.5, 0.6, k=2.0) and not clearly_better(0.6, 0.6, k=2.0)  # no per-sample: means
    assert not clearly_better(float("nan"), 0.6, k=2.0)


def test_every_checkpoint_holds_the_base_unless_clearly_better():
    params = [torch.nn.Parameter(torch.tensor([0.0]))]
    sel = Selection(params, _cfg(rollback=True, rollback_patience=1))
    rng = random.Random(1)
    base = _metric([math.log(2)] * 64)
    sel.remember_base(base)
    noisy = _metric([math.log(2) - 0.001 + rng.gauss(0, 0.05) for _ in range(64)])
    params[0].data.fill_(1.0)
    entry = {}
    with sel.chosen(lambda: noisy, entry, step=3, final=False):          # not the final save either
        assert float(params[0].detach()) == 0.0
    assert entry["weights"] == "base" and entry["dev_loss"] == float(base)
    assert entry["dev_loss_trained"] == float(noisy) and entry["dev_gain_se"] > 0
    assert type(entry["dev_loss"]) is float                              # reported as a plain number
    assert float(params[0].detach()) == 1.0
    good = _metric([math.log(2) - 0.05 + rng.gauss(0, 0.01) for _ in range(64)])
    entry = {}
    with sel.chosen(lambda: good, entry, step=6, final=True):
        assert float(params[0].detach()) == 1.0
    assert "weights" not in entry and entry["dev_gain"] > 2 * entry["dev_gain_se"]
