"""Seed soups (trainers/seed_soup.py): more runs of the recipe while whole ones fit the window, in
other batch orders on the same dev split, averaged when dev says so; none when they do not fit."""
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.config import TrainConfig
from trainers.launch import fit
from trainers.seed_soup import DevJudge, average_weights, fit_with_soup, soup_dir


def _cfg(tmp_path, model, demo_task, **options) -> TrainConfig:
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(demo_task["train"][:160]))
    options = {"lr": 1e-3, "epochs": 2, "saves": 2, "run_name": "ft", **options}
    return TrainConfig(model_path=str(model), train_file=str(train_file), dataset_type=demo_task["dataset_type"],
                       run_dir=str(tmp_path / "runs"), num_workers=0, method="full", batch_tokens=2048, **options)


def _weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _soup(tmp_path, cfg):
    outcome = fit_with_soup(cfg, tmp_path / "model")
    soup = outcome.summary["soup"]
    assert soup["runs"] == 3 and len(soup["dev"]) == 3 and len(soup["run_s"]) == 3
    assert json.loads((tmp_path / "soup.json").read_text()) == soup
    # each run's own loop measured its dev metric on the dev rows evaluated here: one split for all
    assert soup["dev"] == pytest.approx(soup["run_dev"], rel=1e-3)
    return outcome, soup


def test_runs_in_other_orders_are_averaged_when_dev_says_so(tmp_path, tiny_models, demo_task):
    """From a base that has learned the task's format (a fine-tune of the tiny random model), as
    soups are meant for: the average beats the runs' mean on dev and is what goes out."""
    base = fit(_cfg(tmp_path, tiny_models["qwen2"], demo_task, lr=3e-3, epochs=4, saves=1, run_name="pre"),
               tmp_path / "base").model_dir
    cfg = _cfg(tmp_path, base, demo_task, soup_runs=3, train_deadline=time.time() + 600)
    outcome, soup = _soup(tmp_path, cfg)
    runs = [_weights(soup_dir(cfg) / f"run{k}") for k in (1, 2)]
    average = _weights(soup_dir(cfg) / "average")
    name = next(n for n in average if n.endswith("q_proj.weight"))
    assert not torch.equal(runs[0][name], runs[1][name])  # another batch order, another run
    assert soup["chosen"] == "average" and soup["average_dev"] <= sum(soup["dev"]) / 3
    assert outcome.checkpoint_metrics == {"dev_loss": soup["average_dev"], "weights": "soup"}
    assert torch.equal(_weights(outcome.model_dir)[name], average[name])


def test_an_average_worse_than_its_runs_gives_way_to_the_best_run(tmp_path, tiny_models, demo_task):
    """From random weights the runs are not in one basin: their average is worse on dev than they
    are, and the best run on dev goes out instead."""
    cfg = _cfg(tmp_path, tiny_models["qwen2"], demo_task, lr=3e-3, soup_runs=3, train_deadline=time.time() + 600)
    outcome, soup = _soup(tmp_path, cfg)
    best = soup["dev"].index(min(soup["dev"]))
    assert soup["average_dev"] > sum(soup["dev"]) / 3 and soup["chosen"] == f"run {best + 1}"
    chosen = tmp_path / "model" if best == 0 else soup_dir(cfg) / f"run{best}"
    assert outcome.checkpoint_metrics["dev_loss"] == pytest.approx(soup["run_dev"][best])
    assert all(torch.equal(a, b) for a, b in zip(_weights(outcome.model_dir).values(), _weights(chosen).values()))


def test_the_average_is_the_mean_of_every_tensor(tmp_path, tiny_models, demo_task):
    cfg = _cfg(tmp_path, tiny_models["qwen2"], demo_task)
    from trainers.modeling import load_submission

    dirs = []
    for k, scale in enumerate((0.0, 0.02)):
        model = load_submission(cfg.model_path)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        model.save_pretrained(tmp_path / f"m{k}")
        dirs.append(tmp_path / f"m{k}")
    out = average_weights(dirs, tmp_path / "avg")
    a, b, avg = _weights(dirs[0]), _weights(dirs[1]), _weights(out)
    assert set(avg) == set(a) and (out / "config.json").exists()
    for name in a:
        assert torch.allclose(avg[name], (a[name] + b[name]) / 2, atol=1e-6)
    judge = DevJudge(cfg)
    plain = [judge.score(d) for d in dirs]
    assert plain[0] < plain[1]  # the noisy copy is worse than the base on dev
    # a KL-weighted task: + kl_coef x KL to the base, which is 0 for the base's own weights
    weighted = DevJudge(replace(cfg, kl_coef=0.5))
    assert weighted.score(dirs[0]) == pytest.approx(plain[0], abs=1e-5) and weighted.score(dirs[1]) > plain[1]


def test_no_second_run_when_the_first_one_fills_the_window(tmp_path, tiny_models, demo_task):
    """A plan longer than the window: the deadline caps the first run, which leaves no time for
    another; its model goes out and no other run starts."""
    cfg = _cfg(tmp_path, tiny_models["qwen2"], demo_task, epochs=200, soup_runs=3, train_deadline=time.time() + 12)
    outcome = fit_with_soup(cfg, tmp_path / "model")
    assert outcome.summary["steps"] < 200  # 200 epochs are >= 200 steps: the deadline, not the plan, ended it
    assert "soup" not in outcome.summary and not soup_dir(cfg).exists()
    assert (outcome.model_dir / "model.safetensors").exists()


def test_a_failed_extra_run_keeps_the_run_already_made(tmp_path, tiny_models, demo_task, monkeypatch):
    """The second run fails for real inside Ray Train (its data is gone): the first run's model
    stays the outcome, and no third run is tried."""
    import trainers.seed_soup as seed_soup

    cfg = _cfg(tmp_path, tiny_models["qwen2"], demo_task, soup_runs=3, train_deadline=time.time() + 600)
    calls, real_fit = [], seed_soup.fit

    def fit_losing_the_data(run_cfg, out):
        calls.append(run_cfg.run_name)
        if len(calls) == 2:
            Path(run_cfg.train_file).unlink()
        return real_fit(run_cfg, out)
    monkeypatch.setattr(seed_soup, "fit", fit_losing_the_data)
    outcome = fit_with_soup(cfg, tmp_path / "model")
    assert calls == ["ft", "ft-order1"] and "soup" not in outcome.summary
    assert (outcome.model_dir / "model.safetensors").exists() and outcome.checkpoint_metrics["dev_loss"] > 0
