"""Search planning without Ray: trial selection at equal depth, concurrency from the job's GPUs,
trial length from the final run, the search space per task type."""
import pytest

from trainers.config import TrainConfig
from tuning.asha import choose, max_concurrent
from tuning.search import SearchPlan, plan_trial_steps
from tuning.space import apply_choice, lora_ranks, search_space


def _trial(tid, lr, losses):
    return {"trial_id": tid, "config": {"lr": lr}, "iterations": len(losses),
            "curve": [{"step": 2 * (i + 1), "dev_loss": v} for i, v in enumerate(losses)]}


def test_choice_compares_trials_at_the_deepest_rung_reached():
    trials = [_trial("a", 1e-3, [3.0, 2.5, 2.2, 2.1]), _trial("b", 3e-3, [2.0]),   # b: stopped, lower early loss
              _trial("c", 2e-3, [2.9, 2.4, 2.1, 2.0]), _trial("d", 1e-4, [])]
    chosen = choose(trials)
    assert chosen["trial_id"] == "c" and chosen["rung"] == 4 and chosen["dev_loss"] == 2.0
    assert choose([_trial("d", 1e-4, [])]) == {}


def test_concurrency_follows_the_gpus_the_job_holds():
    assert max_concurrent(job_gpus=8, gpus_per_trial=2) == 4
    assert max_concurrent(job_gpus=1, gpus_per_trial=2) == 1
    assert max_concurrent(job_gpus=0, gpus_per_trial=0, cpu_trials=5) == 2   # CPU: at most 2


def test_trial_length_is_a_share_of_what_the_final_run_will_do():
    cfg = TrainConfig(model_path="m", train_file="t", dataset_type={}, epochs=2.0)
    plan = SearchPlan(trial_fraction=0.25, min_trial_steps=8, max_trial_steps=400)
    assert plan_trial_steps(plan, cfg, batches_per_epoch=400, step_s=0.1, window_s=1e6) == 200   # epochs bind
    assert plan_trial_steps(plan, cfg, batches_per_epoch=400, step_s=1.0, window_s=100) == 20    # time binds
    assert plan_trial_steps(plan, cfg, batches_per_epoch=4, step_s=1.0, window_s=1e6) == 8       # floor
    with pytest.raises(ValueError):
        SearchPlan(share=1.5)


def test_instruct_space_searches_lr_around_the_centre_and_rank_below_the_width():
    cfg = TrainConfig(model_path="m", train_file="t", dataset_type={}, method="lora", lora_r=16).to_dict()
    space, first = search_space("InstructTextTask", cfg, 1e-3, hidden_size=128)
    assert space["lr"].lower == pytest.approx(2.5e-4) and space["lr"].upper == pytest.approx(4e-3)
    assert sorted(space["lora_r"].categories) == [16, 32, 64, 128] == lora_ranks(128)
    assert first == [{"lr": 1e-3, "lora_r": 16}]
    full, _ = search_space("InstructTextTask", {**cfg, "method": "full"}, 1e-4, None)
    assert set(full) == {"lr"}
    assert apply_choice(cfg, {"lr": 2e-3, "lora_r": 64}) | {} == {**cfg, "lr": 2e-3, "lora_r": 64, "lora_alpha": 128}
    with pytest.raises(ValueError, match="no search space"):
        search_space("DpoTask", cfg, 1e-5, None)


def test_a_trial_stopped_before_its_first_report_is_unscored_not_a_crash(tmp_path):
    """Tune's time budget can stop a trial before it writes anything: no config, no metrics."""
    from types import SimpleNamespace

    from tuning.asha import _trial_record

    record = _trial_record(SimpleNamespace(path=str(tmp_path / "_trial_1"), metrics=None, config=None, error=None), 4)
    assert record["config"] == {} and record["curve"] == [] and not record["error"] and record["trial_id"] == "_trial_1"
