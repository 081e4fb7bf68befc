"""How much a surface-feature learner could gain on a DPO bench task: the ceiling behind
dpo_logical_reasoning's "trained = base" row (benchmarks/results/task_types.md).

For the pairs whose answers are a fixed label pair ("valid"/"invalid"), a bag-of-words naive Bayes
(word unigrams + bigrams of the prompt) predicts which one is chosen: 5-fold on train.json and
train -> test.json. For shuffled-object tracking, the one cheap cue found: how often the asked
person's starting object is the chosen vs the rejected answer. With pairwise accuracy p and the
best constant margin, the sigmoid DPO loss falls by about (2p - 1)^2 / 2 nats on those rows
(expand -log sigmoid(+-d) around 0: ln 2 - (2p - 1) d / 2 + d^2 / 8, minimised at d = 2(2p - 1)).

    python -m benchmarks.dpo_ceiling [--task ../shared/bench/tasks/dpo_logical_reasoning]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
from pathlib import Path

LABELS = ("valid", "invalid")


def words(prompt: str) -> set[str]:
    w = re.findall(r"[a-z']+", prompt.lower())
    return set(w) | {a + "_" + b for a, b in zip(w, w[1:])}


def naive_bayes_accuracy(train: list[dict], test: list[dict]) -> float:
    counts = {y: collections.Counter() for y in LABELS}
    n = collections.Counter()
    for r in train:
        n[r["chosen"]] += 1
        counts[r["chosen"]].update(words(r["prompt"]))

    def log_odds(prompt: str) -> float:  # valid vs invalid, Laplace-smoothed
        s = math.log(n["valid"] / n["invalid"])
        for f in words(prompt):
            s += math.log((counts["valid"][f] + 1) / (n["valid"] + 2)) - math.log((counts["invalid"][f] + 1) / (n["invalid"] + 2))
        return s

    return sum((log_odds(r["prompt"]) > 0) == (r["chosen"] == "valid") for r in test) / len(test)


def own_object_rates(rows: list[dict]) -> tuple[float, float, int]:
    """Of the tracking pairs: how often the asked person's starting object is the chosen / the rejected answer."""
    chosen = rejected = n = 0
    for r in rows:
        who = re.search(r"At the end of the [a-z ]+?, (\w+)", r["prompt"])
        if not who:
            continue
        head = r["prompt"].split("\n\n")[0]
        own = next((s for s in re.split(r"[,:] ", head) if re.match(rf"(and )?{who.group(1)} ", s)), "")
        n += 1
        chosen += r["chosen"].rstrip(".") in own
        rejected += r["rejected"].rstrip(".") in own
    return chosen / max(n, 1), rejected / max(n, 1), n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", type=Path, default=Path(__file__).resolve().parents[2] / "shared/bench/tasks/dpo_logical_reasoning")
    args = p.parse_args(argv)
    train, test = (json.loads((args.task / f).read_text()) for f in ("train.json", "test.json"))
    labelled = [r for r in train if r["chosen"] in LABELS]
    labelled_test = [r for r in test if r["chosen"] in LABELS]
    random.Random(0).shuffle(labelled)
    k = len(labelled) // 5
    folds = [naive_bayes_accuracy(labelled[:i * k] + labelled[(i + 1) * k:], labelled[i * k:(i + 1) * k]) for i in range(5)]
    cv, held_out = sum(folds) / 5, naive_bayes_accuracy(labelled, labelled_test)
    share = len(labelled_test) / len(test)
    own_c, own_r, n_track = own_object_rates([r for r in test if r["chosen"] not in LABELS])
    report = {
        "task": args.task.name, "label_rows": {"train": len(labelled), "test": len(labelled_test)},
        "valid_share": {"train": sum(r["chosen"] == "valid" for r in labelled) / len(labelled),
                        "test": sum(r["chosen"] == "valid" for r in labelled_test) / len(labelled_test)},
        "naive_bayes_accuracy": {"5_fold_train": round(cv, 4), "train_to_test": round(held_out, 4)},
        "tracking_own_object": {"rows": n_track, "is_chosen": round(own_c, 3), "is_rejected": round(own_r, 3)},
        # the best loss gain on the labelled rows at the cross-validated accuracy, and over the whole test set
        "max_gain_nats": {"labelled_rows": round((2 * cv - 1) ** 2 / 2, 5), "whole_test": round(share * (2 * cv - 1) ** 2 / 2, 5)},
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
