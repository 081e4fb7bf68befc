"""Weight averaging and validation-driven adjustments over the trainable parameters
(training-recipes.md §1.6 "Checkpoint selection", §3.5, §3.7):
- `Ema`: an exponential moving average of the trainable weights, evaluated beside the raw ones;
- `Snapshots`: the weights at each dev evaluation (CPU copies), the best one, and a greedy soup
  (Wortsman 2022) that adds a snapshot only if the dev metric improves, so it is never worse
  than the best single snapshot;
- `Rollback`: after `patience` evaluations worse than the best, restore the best weights and
  lower the LR, a bounded number of times;
- `Selection`: the three as the training loop uses them, from the TrainConfig options, and the
  base guard: a checkpoint holds the trained weights only when they beat the starting ones on
  dev by more than `base_margin_se` standard errors of the paired difference (`clearly_better`).
All work on the list of trainable parameters (`params`): a LoRA adapter or the whole model.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from typing import Callable

import torch

# Keep snapshots in CPU memory only while they stay small next to a worker's RAM.
MAX_SNAPSHOT_BYTES = 8 << 30


def cost(metric: float | None) -> float:
    """The metric for comparisons: a missing or NaN one (a diverged run) is worse than any."""
    return math.inf if metric is None or math.isnan(metric) else metric


class DevMetric(float):
    """A dev metric (the mean over samples) that keeps how it was made: `groups` holds one
    (sum of per-sample metrics, samples) per sample, or per micro-batch where only batch means
    are computed (the packed SFT path). Compares and serialises as the float it is."""

    def __new__(cls, groups: list[tuple[float, int]]):
        n = sum(c for _, c in groups)
        value = super().__new__(cls, sum(s for s, _ in groups) / n if n else math.nan)
        value.groups = [(float(s), int(c)) for s, c in groups]
        return value


def paired_difference(candidate: float, base: float) -> tuple[float, float] | None:
    """(mean, standard error) of candidate - base over the same dev samples, or None where the
    two were not measured on the same groups (or on fewer than 2). Groups are clusters: the SE
    is the cluster-robust one, which is the textbook s/sqrt(n) when every group is one sample."""
    a, b = getattr(candidate, "groups", None), getattr(base, "groups", None)
    if not a or not b or len(a) != len(b) or len(a) < 2 or any(ca != cb for (_, ca), (_, cb) in zip(a, b)):
        return None
    n = sum(c for _, c in a)
    diffs = [((sa - sb) / c, c) for (sa, c), (sb, _) in zip(a, b)]  # per-group mean difference
    mean = sum(d * c for d, c in diffs) / n
    var = len(diffs) / (len(diffs) - 1) * sum((c * (d - mean)) ** 2 for d, c in diffs) / n ** 2
    return mean, math.sqrt(var)


def clearly_better(candidate: float | None, base: float | None, k: float) -> bool:
    """Whether `candidate` beats `base` (lower is better) by more than k standard errors of the
    paired difference on the same dev samples. A few-hundred-row dev metric of a small gain is
    noise-dominated (DPO near ln 2 especially): picking the lower mean alone publishes noise.
    k = 2 (TrainConfig.base_margin_se): about 2% one-sided per look, and the candidate is the best
    looking of several (raw / EMA / soup, each save point), whose gain is optimistic by about one
    SE. Without per-sample values (or k = 0) it is the plain comparison."""
    if cost(candidate) == math.inf:
        return False
    paired = paired_difference(candidate, base) if k > 0 else None
    if paired is None:
        return cost(candidate) < cost(base)
    mean, se = paired
    return mean + k * se < 0


def ema_decay(planned_steps: int, configured: float = 0.0) -> float:
    """The EMA decay: `configured` if set, else one averaging over the last ~10% of the planned
    steps (horizon 1/(1-decay) = steps/10), clamped to [0.998, 0.9999] when the run is long
    enough for that (>= 5000 steps). Shorter runs keep the 10% horizon (at least 2 steps):
    at 0.998 a 50-step run would average mostly the initial weights - an untrained adapter."""
    if configured:
        return configured
    decay = 1.0 - 1.0 / max(2.0, planned_steps / 10)
    return min(0.9999, max(0.998, decay)) if planned_steps >= 5000 else decay


class Ema:
    """Shadow copy of `params`, updated after each optimizer step. The effective decay ramps
    up as min(decay, (1+t)/(10+t)) so the first updates are not dominated by the start point."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.updates = params, 0
        # fp32 even for bf16 weights: a lerp by 1 - decay (0.01..0.1) of a small step rounds away in
        # bf16, as an AdamW step does (trainers/master_weights.py)
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """`decay` is passed each step: the deadline may re-plan the number of steps."""
        self.updates += 1
        d = min(decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):  # one fp32 temporary at a time
            s.lerp_(p.detach().float(), 1.0 - d)

    def applied(self):
        """The EMA weights in the model for the duration (to evaluate or save them)."""
        return swapped(self.params, self.shadow)


@torch.no_grad()
def load(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v.to(p.device, p.dtype))


@contextmanager
def swapped(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """`values` in `params` for the duration; the weights they replaced back afterwards."""
    raw = [p.detach().clone() for p in params]
    load(params, values)
    try:
        yield
    finally:
        load(params, raw)


def cpu_copy(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().to("cpu", copy=True) for p in params]


class Snapshots:
    """The weights at each evaluation with their dev metric (lower is better); keeps the best
    `keep` by metric. `keep=1` holds only the best (what a rollback needs)."""

    def __init__(self, params: list[torch.nn.Parameter], keep: int):
        size = sum(p.numel() * p.element_size() for p in params)
        self.params = params
        self.keep = max(1, min(keep, MAX_SNAPSHOT_BYTES // max(1, size)))
        self.items: list[tuple[float, int, list[torch.Tensor]]] = []  # (metric, step, weights)

    def add(self, metric: float | None, step: int) -> None:
        if cost(metric) == math.inf:
            return
        self.items.append((metric, step, cpu_copy(self.params)))
        self.items.sort(key=lambda it: it[0])
        del self.items[self.keep:]

    @property
    def best(self) -> tuple[float, int, list[torch.Tensor]] | None:
        return self.items[0] if self.items else None

    @torch.no_grad()
    def greedy_soup(self, evaluate: Callable[[], float]) -> tuple[float, list[int]]:
        """Loads the greedy soup into `params`: start from the best snapshot, try the others in
        order of metric, keep one in the uniform average only if `evaluate()` (the dev metric
        of the weights in the model) improves. Returns (metric, steps in the soup)."""
        best_metric, best_step, best_w = self.items[0]
        members, total = [best_step], [w.clone() for w in best_w]
        for metric, step, weights in self.items[1:]:
            trial = [(t + w) / (len(members) + 1) for t, w in zip(total, weights)]
            load(self.params, trial)
            m = cost(evaluate())
            if m < best_metric:
                best_metric, members = m, members + [step]
                total = [t + w for t, w in zip(total, weights)]
        load(self.params, [t / len(members) for t in total])
        return best_metric, members


class Rollback:
    """Counts evaluations worse than the best by more than `tolerance` (relative); after
    `patience` in a row, `check` returns True once: the caller restores the best snapshot and
    the LR scale drops by `factor`. At most `max_times` rollbacks."""

    def __init__(self, patience: int = 2, tolerance: float = 0.0, factor: float = 0.5, max_times: int = 2):
        self.patience, self.tolerance, self.factor, self.max_times = patience, tolerance, factor, max_times
        self.best: float | None = None
        self.bad = self.times = 0
        self.lr_scale = 1.0

    def check(self, metric: float | None) -> bool:
        if metric is None:
            return False
        metric = cost(metric)
        if metric < math.inf and (self.best is None or metric < self.best):
            self.best, self.bad = metric, 0
            return False
        if self.best is not None and metric > self.best * (1 + self.tolerance):
            self.bad += 1
        if self.bad < self.patience or self.times >= self.max_times:
            return False
        self.bad, self.times = 0, self.times + 1
        self.lr_scale *= self.factor
        return True


class Selection:
    """What each save point checkpoints, from the TrainConfig options `ema`, `soup` and
    `rollback`: the better of the raw and EMA weights, at the end the greedy soup of the kept
    snapshots; after a run of worse evaluations, the best weights back at a lower LR."""

    def __init__(self, params: list[torch.nn.Parameter], cfg):
        self.params, self.cfg = params, cfg
        self.ema = Ema(params) if cfg.ema else None
        keep = cfg.soup_size if cfg.soup else 1
        self.snapshots = Snapshots(params, keep) if cfg.soup or cfg.rollback else None
        self.rollback = Rollback(patience=cfg.rollback_patience, max_times=cfg.max_rollbacks if cfg.rollback else 0)
        self.reserve_s = 0.0  # the final soup's dev evaluations: kept back from the deadline
        self.base: tuple[float, list[torch.Tensor]] | None = None

    def remember_base(self, metric: float | None) -> None:
        """The starting weights and their dev metric (a DevMetric for the paired test): every
        checkpoint holds them unless the trained weights are `clearly_better`. A run that only
        fits noise (DPO on labels a small model cannot learn: the loss drifts above ln 2) then
        publishes what the base model does instead of something worse - also when killed early,
        and the best-by-dev choice among checkpoints cannot pick a noise-lucky one."""
        size = sum(p.numel() * p.element_size() for p in self.params)
        if metric is not None and not math.isnan(metric) and size <= MAX_SNAPSHOT_BYTES:
            self.base = (metric, cpu_copy(self.params))

    def after_step(self, planned_steps: int) -> None:
        if self.ema is not None:
            self.ema.update(ema_decay(planned_steps, self.cfg.ema_decay))

    @contextmanager
    def chosen(self, evaluate: Callable[[], float | None], entry: dict, step: int, final: bool):
        """The weights to checkpoint in the model for the duration; their dev metric (and the
        EMA's, the soup's members) in `entry`."""
        t0 = time.time()
        with ExitStack() as held:
            entry["dev_loss"] = evaluate()
            if self.ema is not None and entry["dev_loss"] is not None:
                with self.ema.applied():
                    entry["dev_loss_ema"] = evaluate()
                if cost(entry["dev_loss_ema"]) < cost(entry["dev_loss"]):
                    held.enter_context(self.ema.applied())
                    entry["dev_loss"], entry["weights"] = entry["dev_loss_ema"], "ema"
            if self.snapshots is not None:
                self.snapshots.add(entry["dev_loss"], step)
                if self.cfg.soup:
                    self.reserve_s = (time.time() - t0) * (self.snapshots.keep - 1)
            if final and self.cfg.soup and len(self.snapshots.items) > 1:
                entry["dev_loss"], entry["soup"] = self.snapshots.greedy_soup(evaluate)
                entry["weights"] = "soup" if len(entry["soup"]) > 1 else f"step {entry['soup'][0]}"
            if self.base is not None:
                self._guard(entry, held)
            for key in ("dev_loss", "dev_loss_ema", "dev_loss_trained"):  # plain floats to report
                if entry.get(key) is not None:
                    entry[key] = float(entry[key])
            yield

    def _guard(self, entry: dict, held: ExitStack) -> None:
        """The base weights in the checkpoint unless the chosen ones are clearly better on dev;
        the paired gain and its standard error in `entry` (dev_gain, dev_gain_se)."""
        paired = paired_difference(entry["dev_loss"], self.base[0])
        if paired is not None:
            entry["dev_gain"], entry["dev_gain_se"] = -paired[0], paired[1]
        if not clearly_better(entry["dev_loss"], self.base[0], self.cfg.base_margin_se):
            held.enter_context(swapped(self.params, self.base[1]))
            entry["dev_loss_trained"] = entry["dev_loss"]
            entry["dev_loss"], entry["weights"] = self.base[0], "base"

    def maybe_roll_back(self, entry: dict) -> bool:
        """After `rollback_patience` worse evaluations: the best weights back (EMA too); the
        LR scale (`lr_scale`) lowered."""
        if not self.rollback.check(entry.get("dev_loss_trained", entry.get("dev_loss"))):
            return False
        _, best_step, best = self.snapshots.best
        load(self.params, best)
        if self.ema is not None:
            load(self.ema.shadow, best)
        entry["rollback_to"] = best_step
        return True

    @property
    def lr_scale(self) -> float:
        return self.rollback.lr_scale
