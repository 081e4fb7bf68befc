"""The dev split: stratified by length and near-duplicate aware (training-recipes.md §1.6, §3.5).

Near-duplicates are found with MinHash over token 5-gram shingles (64 hashes, LSH with 16 bands
of 4, estimated Jaccard >= 0.8, as the position-1 trainer does). Each group of near-duplicates
goes to one side as a whole: a dev row whose twin is in train would make the dev metric
optimistic and reward memorisation, which the validator's separate test set does not. The dev
rows are then drawn per length quartile in proportion to its size, so the dev metric weighs short
and long samples as the test set does. Deterministic for a seed: identical on every worker.
"""
from __future__ import annotations

import random

import numpy as np

SHINGLE = 5
N_HASHES = 64
BANDS = 16
THRESHOLD = 0.8
STRATA = 4
MAX_FRACTION = 0.5
_PRIME = (1 << 31) - 1


def tokens_of(ex) -> list[int]:
    """The token ids that identify an example: the whole text (SFT) or prompt + chosen (DPO)."""
    if hasattr(ex, "input_ids"):
        return list(ex.input_ids)
    return list(ex.prompt) + list(ex.chosen)


def minhash(tokens: list[int], seed: int = 0) -> np.ndarray:
    """N_HASHES min-hashes of the example's token shingles (a short example is one shingle)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, N_HASHES, dtype=np.int64)
    b = rng.integers(0, _PRIME, N_HASHES, dtype=np.int64)
    n = max(1, len(tokens) - SHINGLE + 1)
    shingles = np.array([hash(tuple(tokens[i:i + SHINGLE])) % _PRIME for i in range(n)], dtype=np.int64)
    return ((a[:, None] * shingles[None, :] + b[:, None]) % _PRIME).min(axis=1)


def near_duplicate_groups(token_lists: list[list[int]]) -> list[int]:
    """The group id of each example: examples with estimated Jaccard >= THRESHOLD share one
    (transitively, through union-find over LSH-bucket candidates)."""
    parent = list(range(len(token_lists)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sigs = np.stack([minhash(t) for t in token_lists]) if token_lists else np.zeros((0, N_HASHES))
    rows = N_HASHES // BANDS
    for band in range(BANDS):
        buckets: dict[bytes, list[int]] = {}
        for i, key in enumerate(sigs[:, band * rows:(band + 1) * rows]):
            buckets.setdefault(key.tobytes(), []).append(i)
        for members in buckets.values():
            first = members[0]
            for j in members[1:]:
                if find(j) != find(first) and (sigs[first] == sigs[j]).mean() >= THRESHOLD:
                    parent[find(j)] = find(first)
    return [find(i) for i in range(len(token_lists))]


def split_dev(examples: list, fraction: float, max_dev: int, seed: int) -> tuple[list, list]:
    """(train, dev): about min(max_dev, fraction x rows) dev rows, drawn as whole near-duplicate
    groups, per length quartile in proportion to its size; never more than half the rows (a recipe's
    dev_scale can push the fraction to 1). No dev split under 20 examples."""
    if fraction <= 0 or len(examples) < 20:
        return examples, []
    n_dev = max(1, min(max_dev, int(len(examples) * min(fraction, MAX_FRACTION))))
    group_of = near_duplicate_groups([tokens_of(ex) for ex in examples])
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_of):
        groups.setdefault(g, []).append(i)
    # length quartile of a group: that of its longest member
    lengths = sorted(len(ex) for ex in examples)
    edges = [lengths[len(lengths) * k // STRATA] for k in range(1, STRATA)]
    strata: list[list[list[int]]] = [[] for _ in range(STRATA)]
    for members in groups.values():
        longest = max(len(examples[i]) for i in members)
        strata[sum(longest > e for e in edges)].append(members)
    rng = random.Random(seed)
    dev_idx: list[int] = []
    for stratum in strata:
        quota = round(n_dev * sum(len(m) for m in stratum) / len(examples))
        rng.shuffle(stratum)
        taken = 0
        for members in sorted(stratum, key=len):  # singletons first: a big group would eat the quota
            if taken + len(members) > quota:
                break
            dev_idx.extend(members)
            taken += len(members)
    chosen = set(dev_idx)
    return [ex for i, ex in enumerate(examples) if i not in chosen], [examples[i] for i in sorted(chosen)]
