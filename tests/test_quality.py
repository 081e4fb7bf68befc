"""Quality options (trainers/dev_split.py, trainers/averaging.py, LoRA variants): the dev split
keeps near-duplicates on one side and follows the length mix; the greedy soup is never worse
than the best snapshot; a rollback restores the best weights and lowers the LR; EMA and DoRA
change what is trained (and the EMA weights are what the checkpoint holds when they are better)."""
import json
import random

import pytest
import torch

from trainers.averaging import Ema, Rollback, Snapshots, ema_decay
from trainers.config import TrainConfig
from trainers.dev_split import split_dev
from trainers.instruct_format import Example


def _example(tokens: list[int]) -> Example:
    return Example(tokens, tokens)


def test_near_duplicates_never_straddle_the_split_and_lengths_are_stratified():
    rng = random.Random(0)
    originals = [[rng.randrange(8000) for _ in range(rng.choice([12, 40, 90, 200]))] for _ in range(300)]
    examples, family = [], []
    for k, toks in enumerate(originals):
        copies = 1 + (k % 3)  # singletons, pairs and triples of near-duplicates
        for _ in range(copies):
            twin = list(toks)
            twin[-1] = rng.randrange(8000)  # another last token: Jaccard >= 0.97 for the long ones
            examples.append(_example(twin if len(toks) >= 90 else list(toks)))
            family.append(k)
    train, dev = split_dev(examples, fraction=0.1, max_dev=1000, seed=3)
    side = {id(ex): "dev" for ex in dev} | {id(ex): "train" for ex in train}
    sides_of: dict[int, set] = {}
    for ex, k in zip(examples, family):
        sides_of.setdefault(k, set()).add(side[id(ex)])
    assert all(len(s) == 1 for s in sides_of.values())
    assert len(train) + len(dev) == len(examples) and 0.07 * len(examples) <= len(dev) <= 0.1 * len(examples)
    short = lambda xs: sum(len(x) < 30 for x in xs) / len(xs)  # noqa: E731
    assert abs(short(dev) - short(examples)) < 0.08


def test_the_dev_split_leaves_at_least_half_the_rows_to_train():
    """A recipe's dev_scale (DPO: 4x) times a large dev_fraction would make every row dev and leave
    the run nothing to train on."""
    rng = random.Random(1)
    examples = [_example([rng.randrange(8000) for _ in range(20)]) for _ in range(100)]
    train, dev = split_dev(examples, fraction=1.0, max_dev=1000, seed=0)
    assert 45 <= len(dev) <= 50 and len(train) + len(dev) == 100


def _params(*values):
    return [torch.nn.Parameter(torch.tensor([v])) for v in values]


def test_greedy_soup_never_worse_than_the_best_snapshot():
    params = _params(0.0)
    target = 1.0
    evaluate = lambda: float((params[0].detach() - target).abs())  # noqa: E731
    snaps = Snapshots(params, keep=4)
    for step, w in enumerate([0.2, 1.1, 5.0, 0.9]):  # best single: 1.1 (0.1); 1.1 + 0.9 average to 1.0
        params[0].data.fill_(w)
        snaps.add(evaluate(), step)
    metric, members = snaps.greedy_soup(evaluate)
    assert metric == evaluate() and metric < 0.1 - 1e-6 and sorted(members) == [1, 3]
    # a soup of snapshots that all pull the wrong way keeps the best single one
    snaps2 = Snapshots(params, keep=3)
    for step, w in enumerate([0.8, 3.0, -2.0]):
        params[0].data.fill_(w)
        snaps2.add(evaluate(), step)
    metric, members = snaps2.greedy_soup(evaluate)
    assert members == [0] and abs(float(params[0].detach()) - 0.8) < 1e-6 and abs(metric - 0.2) < 1e-6


def test_rollback_restores_the_best_and_lowers_the_lr_a_bounded_number_of_times():
    rb = Rollback(patience=2, factor=0.5, max_times=1)
    assert [rb.check(m) for m in (3.0, 2.0, 2.5, 2.6)] == [False, False, False, True]
    assert rb.lr_scale == 0.5
    assert [rb.check(m) for m in (2.7, 2.8, 2.9)] == [False, False, False]  # bounded: no second one
    assert rb.lr_scale == 0.5


def test_ema_decay_choice_and_average():
    assert ema_decay(100_000) == 0.9999 and ema_decay(5000) == 0.998 and ema_decay(50) == 0.8
    params = _params(0.0)
    ema = Ema(params)
    for _ in range(50):
        params[0].data.add_(1.0)
        ema.update(0.8)
    with ema.applied():
        averaged = float(params[0].detach())
    assert float(params[0].detach()) == 50.0 and 44.0 < averaged < 47.0  # lags the raw weight by ~decay/(1-decay)


def test_ema_of_bf16_weights_keeps_the_small_steps():
    """The shadow is fp32: lerps by 1 - decay of a bf16 weight's one-spacing steps add up (in a
    bf16 shadow each one rounds away and the average would stay at the start)."""
    import torch

    w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    ema, reference = Ema([w]), 1.0
    for _ in range(50):
        w.data.add_(2**-7)  # one bf16 spacing at 1.0
        ema.update(0.99)
        d = min(0.99, (1 + ema.updates) / (10 + ema.updates))
        reference += (1 - d) * (float(w[0].detach()) - reference)
    assert ema.shadow[0].dtype == torch.float32
    assert float(ema.shadow[0][0]) == pytest.approx(reference, abs=1e-5) and reference > 1.05


def test_ema_and_dora_change_what_is_trained(short_fit, tmp_path, tiny_models, demo_task):
    from safetensors.torch import load_file

    model = tiny_models["llama"]
    plain = short_fit(tmp_path, model, demo_task, "plain")
    ema = short_fit(tmp_path, model, demo_task, "ema", ema=True, soup=True)
    dora = short_fit(tmp_path, model, demo_task, "dora", lora_dora=True)
    evals = [h for h in ema.summary["history"] if "dev_loss" in h]
    assert all("dev_loss_ema" in h for h in evals)
    final = evals[-1]  # the checkpoint holds the best of raw, EMA and soup
    assert final["dev_loss"] <= min(final["dev_loss_ema"], min(h["dev_loss"] for h in evals[:-1]))
    weights = {n: load_file(str(o.model_dir / "adapter_model.safetensors")) for n, o in
               (("plain", plain), ("dora", dora))}
    assert not any("magnitude" in k for k in weights["plain"])
    assert any("magnitude" in k for k in weights["dora"])
    assert json.loads((dora.model_dir / "adapter_config.json").read_text())["use_dora"] is True


def test_rollback_in_the_training_loop(short_fit, tmp_path, tiny_models, demo_task, monkeypatch):
    from trainers import instruct

    # a scripted dev metric (best at the 2nd evaluation, then worse twice, NaN included) drives the loop
    script = iter([5.0, 4.0, 4.5, float("nan"), 3.9, 3.8, 3.7, 3.6, 3.5, 3.4])
    monkeypatch.setattr(instruct.Steps, "dev_loss", lambda self, dev: next(script))
    out = short_fit(tmp_path, tiny_models["llama"], demo_task, "rb", rollback=True, rollback_patience=2, saves=6, epochs=3,
               keep_base=False)  # the script scores the save points only
    history = out.summary["history"]
    evals = [h for h in history if "dev_loss" in h]
    rolled = [h for h in history if "rollback_to" in h]
    assert [h["step"] for h in rolled] == [evals[3]["step"]] and rolled[0]["rollback_to"] == evals[1]["step"]
    cfg = TrainConfig(model_path="-", train_file="-", dataset_type={}, lr=3e-3)
    total, at = out.summary["planned_steps"], rolled[0]["step"]
    after = next(h for h in history if h["step"] == at + 1)
    assert abs(after["lr"] - 0.5 * instruct.lr_at(at, total, cfg)) < 1e-12


def test_selection_rolls_back_to_the_best_weights():
    from trainers.averaging import Selection

    params = _params(0.0)
    cfg = TrainConfig(model_path="-", train_file="-", dataset_type={}, rollback=True, rollback_patience=1)
    sel = Selection(params, cfg)
    for step, (w, metric) in enumerate([(1.0, 2.0), (2.0, 1.0), (3.0, 1.5)]):
        params[0].data.fill_(w)
        entry = {}
        with sel.chosen(lambda: metric, entry, step, final=False):
            pass
        rolled = sel.maybe_roll_back(entry)
    assert rolled and entry["rollback_to"] == 1 and float(params[0].detach()) == 2.0 and sel.lr_scale == 0.5


def test_the_last_checkpoint_is_never_worse_than_the_starting_weights():
    from trainers.averaging import Selection

    params = _params(0.0)
    evaluate = lambda: float(params[0].detach().abs())  # noqa: E731 - the start (0.0) is the optimum here
    sel = Selection(params, TrainConfig(model_path="-", train_file="-", dataset_type={}))
    sel.remember_base(evaluate())
    params[0].data.fill_(0.25)                                  # training only added noise
    entry = {}
    with sel.chosen(evaluate, entry, step=5, final=True):
        assert float(params[0].detach()) == 0.0                 # what gets checkpointed: the start
    assert entry["weights"] == "base" and entry["dev_loss"] == 0.0
    assert float(params[0].detach()) == 0.25                    # and the trained weights are back after
    sel.remember_base(0.5)                                      # a start that the trained weights beat
    entry = {}
    with sel.chosen(evaluate, entry, step=6, final=True):
        assert float(params[0].detach()) == 0.25
    assert "weights" not in entry and entry["dev_loss"] == 0.25
