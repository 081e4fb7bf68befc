"""ASHA on a real local Ray cluster (Tune function trainables around Train V2 TorchTrainers),
and the whole search (range test + ASHA) held inside its share of the job's window."""
import json
import time

import pytest
from conftest import BENCH

from trainers.config import TrainConfig
from tuning.asha import AshaConfig, run_asha
from tuning.range_test import RangeTestConfig
from tuning.search import SearchPlan, tune_hyperparameters

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, object_store_memory=300_000_000, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, demo_task, request):
    pico = BENCH / "models" / "pico-llama"
    model = pico if (pico / "config.json").exists() else request.getfixturevalue("base_model")
    root = tmp_path_factory.mktemp("search")
    (root / "train.json").write_text(json.dumps(demo_task["train"][:240]))
    return TrainConfig(model_path=str(model), train_file=str(root / "train.json"),
                       dataset_type=demo_task["dataset_type"], method="lora", lora_r=16, lora_alpha=32,
                       batch_tokens=1024, max_batch=8, max_dev_rows=24, dev_fraction=0.1, seed=3,
                       cpus_per_worker=0.5), root  # two trials fit on 2 CPUs


def test_asha_runs_four_trials_and_stops_a_bad_one_early(ray_cluster, job):
    cfg, root = job
    # The centre (a good LoRA LR) and 1e-7 (learns nothing) run side by side; 2e-7 comes after
    # both have reported their first dev loss, so ASHA (rf 2: keep the better half) must stop it
    # there. The fourth trial is drawn from the search space.
    asha = AshaConfig(trials=4, rungs=4, grace=1, reduction_factor=2, trial_steps=4, concurrent=2,
                      extra_points=[{"lr": 1e-7}, {"lr": 2e-7}])
    result = run_asha(cfg, root / "out", centre_lr=3e-3, asha=asha, batches_per_epoch=27, hidden_size=128)
    assert len(result.trials) == 4 and not any(t["error"] for t in result.trials)
    late_bad = next(t for t in result.trials if t["config"]["lr"] == 2e-7)
    assert late_bad["stopped_early"] and late_bad["iterations"] == 1
    full = [t for t in result.trials if t["iterations"] == 4]
    assert full and all(t["steps"] == 4 for t in full)             # 4 steps, a dev loss after each
    assert all(c["dev_loss"] > 0 for t in result.trials for c in t["curve"])
    assert result.chosen["config"]["lr"] not in (1e-7, 2e-7) and result.chosen["rung"] == 4
    assert 3e-3 / 4 <= result.chosen["config"]["lr"] <= 3e-3 * 4
    assert result.chosen["config"]["lora_r"] in (16, 32, 64, 128)


def test_search_stays_inside_its_share_of_the_window(ray_cluster, job, tmp_path):
    cfg, _ = job
    window, share = 200.0, 0.2                                     # 40 s for the search
    plan = SearchPlan(share=share, range_test=RangeTestConfig(steps=16, cached_batches=3), range_test_share=0.25,
                      asha=AshaConfig(trials=50, rungs=4), trial_startup_s=2.0,
                      min_trial_steps=40, max_trial_steps=40)      # 50 long trials cannot fit: the budget binds
    t0 = time.time()
    tuned, outcome = tune_hyperparameters(cfg, tmp_path, window_s=window, prior_lr=3e-3, known_lrs=[1e-3], plan=plan)
    spent = time.time() - t0
    assert spent <= share * window, f"search took {spent:.1f} s of a {share * window:.0f} s budget"
    assert outcome.seconds <= outcome.budget_s and outcome.share_used <= share
    asha = outcome.asha                                            # ASHA ran and was cut by its time budget
    assert asha is not None and len(asha["trials"]) + asha["extra"]["unscored"] < 50
    assert asha["extra"]["settings"]["time_budget_s"] < share * window
    assert outcome.prior_lr == pytest.approx((3e-3 * 1e-3) ** 0.5)             # knowledge-base refined
    assert tuned.lr == outcome.chosen["lr"] and outcome.source in ("asha", "range_test")
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["chosen"] == outcome.chosen and saved["range_test"]["lrs"]
    assert (tmp_path / "range_test.png").exists()
