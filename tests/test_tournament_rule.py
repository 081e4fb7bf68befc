"""The tournaments' per-sample rule (benchmarks/tournament_rule.py) on synthetic loss vectors, and
the per-example test losses it is fed (quality.TestSet.per_sample) against trainers.evaluate's
mean metric on a tiny model."""
import json
import math

import numpy as np
import pytest

from benchmarks.tournament_rule import ADVANCES, DRAW, KEEPS, judge


def _defender(n=400, seed=0, scale=1.0):
    return np.random.default_rng(seed).gamma(2.0, 0.5, n) * scale  # mean about `scale`


def test_a_clear_broad_win_advances_in_both_rounds():
    d = _defender()
    c = d - 0.05 + np.random.default_rng(1).normal(0, 0.01, d.size)
    v = judge(d, c)
    assert v.decided == v.challenger_wins > 0.95 * d.size and v.win_rate_lb > 0.9
    assert v.mean_gap_lb > v.required_gap and v.boss == ADVANCES and v.knockout == ADVANCES


def test_a_lower_mean_from_a_few_huge_wins_while_losing_most_samples_does_not_advance():
    d = _defender()
    c = d + 0.03          # ours loses 90% of the samples narrowly...
    c[:40] = d[:40] - 2.0  # ...and wins 10% hugely: a lower mean all the same
    v = judge(d, c)
    assert c.mean() < d.mean() and v.mean_gap > v.required_gap
    assert v.challenger_wins == 40 and v.defender_wins == 360 and v.boss == KEEPS
    # knockout: the majority (the defender) advances unless it is worse on the scalar loss; with
    # the raw means as scalars it is, so the lower-mean model goes through
    assert v.knockout == ADVANCES
    # with ranking losses where the majority winner is not worse (a KL term on the challenger), the majority rules
    assert judge(d, c, defender_scalar=1.0, challenger_scalar=1.2).knockout == KEEPS


def test_the_knockout_majority_advances_when_its_scalar_agrees():
    d = _defender()
    c = d - 0.02
    c[:150] = d[:150] + 0.02  # ours wins 250 of 400 samples, and the mean
    assert judge(d, c).knockout == ADVANCES
    assert judge(c, d).knockout == KEEPS  # the other way round: the defender's majority


def test_all_tiny_differences_are_a_draw():
    d = _defender()
    c = d + np.random.default_rng(2).uniform(-0.009, 0.009, d.size)
    v = judge(d, c)
    assert v.decided == 0 and v.win_rate == 0.0 and v.boss == DRAW
    assert v.knockout == (ADVANCES if c.mean() < d.mean() else KEEPS)  # nothing decided: the lower mean


def _share(wins: int, losses: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.full(wins + losses, 2.0)
    c = np.concatenate([d[:wins] - 0.5, d[wins:] + 0.1])  # big wins, small losses: the mean gap clears its bar
    return d, c


def test_a_win_rate_of_56_percent_whose_bound_is_below_55_does_not_advance():
    v = judge(*_share(112, 88))
    assert v.win_rate == pytest.approx(0.56) and v.win_rate_lb < 0.55
    assert v.mean_gap_lb >= v.required_gap and v.boss == KEEPS  # the win-rate bar alone stops it
    v = judge(*_share(130, 70))  # 65% of the same number: its bound clears 55%
    assert v.win_rate_lb >= 0.55 and v.boss == ADVANCES


def test_the_required_gap_is_1_percent_of_the_defenders_mean_loss():
    high = _defender(scale=5.0)
    v = judge(high, high - 0.03)  # every sample won by 0.03, but 1% of ~5 nats is ~0.05
    assert v.win_rate == 1.0 and v.required_gap == pytest.approx(0.01 * high.mean())
    assert v.required_gap > 0.04 and v.boss == KEEPS
    low = _defender(scale=0.5)
    v = judge(low, low - 0.03)  # 1% of ~0.5 is below the 0.01 floor
    assert v.required_gap == 0.01 and v.boss == ADVANCES


def test_a_challenger_worse_on_the_scalar_loss_does_not_take_the_boss_task():
    d = _defender()
    assert judge(d, d - 0.05, defender_scalar=1.0, challenger_scalar=1.1).boss == KEEPS


def test_non_finite_examples_are_dropped_from_both_sides():
    d = _defender()
    c = d - 0.05 + np.random.default_rng(3).normal(0, 0.05, d.size)
    keep = np.ones(d.size, bool)
    keep[[3, 50, 77]] = False
    d2, c2 = d.copy(), c.copy()
    d2[3], c2[50], c2[77] = np.nan, np.inf, np.nan
    assert judge(d2, c2) == judge(d[keep], c[keep]) and judge(d2, c2).n == d.size - 3


def test_losing_samples_reports_the_worst_gaps_and_terciles():
    from benchmarks.tournament_rule import comparisons
    from benchmarks.tournament_rule_report import analyses

    d = _defender()
    c = d + 0.03
    c[:40] = d[:40] - 2.0
    tokens = list(range(d.size))
    c[399] = d[399] + 1.0  # the longest sample: the worst loss
    runs = {("t", name, 1, 10.0): {"losses": list(x), "test": float(x.mean()), "tokens": tokens}
            for name, x in (("ours", c), ("c_strong", d))}
    found = analyses(comparisons(runs, resamples=500), runs)
    assert len(found) == 1 and found[0]["lost"] == 360 and found[0]["won"] == 40
    assert found[0]["worst"][0]["index"] == 399 and found[0]["worst"][0]["gap"] == pytest.approx(-1.0)
    assert [t["n"] for t in found[0]["terciles"]] == [134, 133, 133] and found[0]["terciles"][0]["won"] == 40


def _task_dir(tmp_path, task_type, dataset_type, rows):
    task = tmp_path / task_type
    task.mkdir()
    (task / "task.json").write_text(json.dumps({"task_type": task_type, "dataset_type": dataset_type}))
    (task / "test.json").write_text(json.dumps(rows))
    return task


@pytest.fixture()
def perturbed(base_model):
    """The base model with noise on its weights: a 'trained' model unlike the DPO reference."""
    import torch

    from trainers.evaluate import load_submission

    model = load_submission(base_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_per_sample_losses_average_to_the_evaluators_metric(tmp_path, base_model, demo_task, perturbed):
    from benchmarks import quality
    from trainers.evaluate import dpo_eval_loss, instruct_loss
    from trainers.instruct import sample_losses

    rows = demo_task["test"][:12]
    test = quality.TestSet(_task_dir(tmp_path, "InstructTextTask", demo_task["dataset_type"], rows), base_model, 0)
    losses = test.per_sample(perturbed)
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses) and len(set(losses)) == 12
    assert np.mean(losses) == pytest.approx(instruct_loss(perturbed, str(base_model), rows, demo_task["dataset_type"]),
                                            rel=1e-5)
    # each value is its own example's (the batches are reordered by length): one at a time agrees
    alone = [sample_losses(perturbed, [ex], test.pad_id, quality.DEVICE, 4096)[0] for ex in test.examples]
    assert np.allclose(losses, alone, rtol=1e-4)

    pairs = [{"prompt": r["instruct"] + " " + r["input"], "chosen": r["output"], "rejected": r["output"][::-1]}
             for r in rows]
    dt = {"field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected"}
    test = quality.TestSet(_task_dir(tmp_path, "DpoTask", dt, pairs), base_model, 0)
    assert test.base == pytest.approx(math.log(2), abs=1e-6)  # the base against itself
    losses = test.per_sample(perturbed)
    assert len(losses) == 12 and np.std(losses) > 1e-4
    assert np.mean(losses) == pytest.approx(dpo_eval_loss(perturbed, str(base_model), pairs, dt), rel=1e-5)


def test_alternative_challengers_apply_their_changes_left_to_right(tmp_path):
    """--alt names: 'full' and 'lora' swap in the planner's hyperparameters of that method, lr_xK and
    epK then scale the LR and set the epochs; an unknown part is refused, not ignored."""
    from benchmarks.quality import Runs
    from benchmarks.tournament_rule import alt_config
    from tests.conftest import BENCH

    if not (BENCH / "models" / "pico-llama" / "config.json").exists():
        pytest.skip("needs ../shared/bench")
    runs = Runs(BENCH, BENCH / "models" / "pico-llama", 100, 0, tmp_path)
    task = "instruct_wordplay"
    full, lora = alt_config(runs, task, "full"), alt_config(runs, task, "lora")
    assert (full["method"], lora["method"]) == ("full", "lora") and lora["lr"] > full["lr"]
    hot = alt_config(runs, task, "full+lr_x2+ep4")
    assert hot["method"] == "full" and hot["lr"] == pytest.approx(2 * full["lr"]) and hot["epochs"] == 4.0
    # order matters: a method swap after the LR change takes that method's own LR
    assert alt_config(runs, task, "lr_x2+full")["lr"] == pytest.approx(full["lr"])
    for bad in ("full+bogus", "ep", "lr_xfoo"):
        with pytest.raises(SystemExit, match="unknown --alt"):
            alt_config(runs, task, bad)
