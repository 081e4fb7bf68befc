"""The one checkpoint choice (trainers.paths.best_by_dev) that the trainer's result, the
watchdog and the fallback publish all use: lowest dev loss, the latest among equals, the
latest when no checkpoint has a dev loss."""
from types import SimpleNamespace

from trainers.launch import latest_good_checkpoint
from trainers.paths import best_by_dev


def pick(metrics: list[dict]):
    return best_by_dev(metrics, lambda m: m.get("dev_loss"), lambda m: m["step"])


def test_lowest_dev_loss_wins_and_the_latest_breaks_a_tie():
    assert pick([{"step": 1, "dev_loss": 2.0}, {"step": 2, "dev_loss": 1.5}, {"step": 3, "dev_loss": 1.7}])["step"] == 2
    assert pick([{"step": 1, "dev_loss": 1.5}, {"step": 2, "dev_loss": 1.5}, {"step": 3, "dev_loss": 1.9}])["step"] == 2


def test_without_dev_losses_the_latest_and_without_candidates_none():
    assert pick([{"step": 4}, {"step": 9}, {"step": 2}])["step"] == 9
    assert pick([{"step": 4}, {"step": 9, "dev_loss": 3.0}])["step"] == 9  # a scored one beats unscored later ones
    assert pick([{"step": 9}, {"step": 4, "dev_loss": 3.0}])["step"] == 4
    assert pick([]) is None


def test_the_trainers_result_uses_the_same_rule():
    result = SimpleNamespace(best_checkpoints=[("a", {"step": 10, "dev_loss": 1.0}), ("b", {"step": 20, "dev_loss": 1.0}),
                                               ("c", {"step": 30, "dev_loss": 1.2}), ("d", {})],
                             checkpoint="c", metrics={"step": 30})
    assert latest_good_checkpoint(result)[0] == "b"
    assert latest_good_checkpoint(SimpleNamespace(best_checkpoints=[], checkpoint="z", metrics=None)) == ("z", {})
