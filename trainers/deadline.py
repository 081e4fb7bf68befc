"""The deadline planner every recipe trains by: wall-clock time -> optimizer steps.

A run starts from a plan in steps (its epochs), with `saves` evenly spaced save points (dev
evaluation + checkpoint). A few probe steps measure the step time; the plan is then capped to
the steps that fit before the deadline, less what the end keeps back (the remaining saves at
their measured cost, the final selection, a dev pass), and the save points are spread again over
what remains. A recipe stops when one more step and its last save would end past the deadline.

The SFT/DPO loop (loop.py) and the GRPO callback (grpo.py) both drive a `DeadlinePlan`; where
they differ (a warm-up step excluded from the probe, whether the step being re-planned can still
save) is a parameter here, so each keeps the schedule it had.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

PROBE_STEPS = 5  # optimizer steps timed before the first re-plan


def steps_that_fit(now: float, deadline: float, per_step: float, saves_left: int, save_s: float) -> int:
    """Optimizer steps that still fit before `deadline`, keeping back the remaining dev
    evaluations and checkpoints at their measured cost, with a 10% margin."""
    return int(max(0.0, deadline - now - saves_left * save_s) / max(per_step, 1e-6) * 0.9)


def saves_within(share: float, window_s: float, save_s: float, saves: int) -> int:
    """The dev evaluations (with their checkpoints) that fit in `share` of the training window
    at their measured cost, between 2 and `saves` (share 0: `saves`). When the deadline binds,
    every evaluation is optimizer steps not taken; on short runs the dev metric falls at every
    save and only the last ones can be chosen. Two at least: a checkpoint half-way, so that a
    crash late in the run resumes from it instead of the start, and the final one."""
    if share <= 0 or save_s <= 0:
        return saves
    return max(min(2, saves), min(saves, int(share * window_s / save_s)))


def spread(total: int, saves: int, floor: int = 0) -> set[int]:
    """`saves` save points evenly over `total` steps, none before `floor`."""
    return {max(floor, int(total * (k + 1) / saves)) for k in range(saves)}


@dataclass
class DeadlinePlan:
    total: int                         # planned optimizer steps (absolute, counting resumed ones)
    saves: int                         # save points to spread over the plan when it is capped
    save_points: set[int]
    train_deadline: float = 0.0        # unix time training must stop by (0: none)
    resume_step: int = 0               # steps trained before a restart
    warmup_steps: int = 1              # steps before the probe's clock starts (torch.compile's warm-up)
    stop_at: float = 0.0               # the deadline less what the end keeps back (0: none)
    per_step: float = 0.0              # measured seconds per optimizer step (0: not measured yet)
    save_s: float = 0.0                # measured seconds of one dev evaluation + checkpoint
    clock: float | None = field(default=None, repr=False)  # when the probe's timing started

    def __post_init__(self):
        if not self.stop_at:
            self.stop_at = self.train_deadline

    # -- the probe -------------------------------------------------------------------------
    @property
    def probe_end(self) -> int:
        """Steps since the (re)start after which the probe has measured the step time."""
        return self.warmup_steps + PROBE_STEPS

    def start_clock(self, now: float | None = None) -> None:
        self.clock = time.time() if now is None else now

    def tick(self, step: int, now: float) -> bool:
        """After optimizer step `step`: starts the probe's clock once the warm-up is done; True
        at the probe's end, with `per_step` measured (the caller re-plans then). Without a
        deadline nothing is measured: there is nothing to plan against."""
        done = step - self.resume_step
        if done == self.warmup_steps and self.warmup_steps:
            self.start_clock(now)
        if done == self.probe_end and self.clock is not None and self.train_deadline:
            self.per_step = (now - self.clock) / PROBE_STEPS
            return True
        return False

    def remeasure(self, step: int, now: float) -> None:
        """The step time over every step since the clock started (each save's time excluded by
        measuring at the save's start)."""
        self.per_step = (now - self.clock) / max(1, step - self.resume_step - self.warmup_steps)

    # -- re-planning -----------------------------------------------------------------------
    def saves_left(self, step: int) -> int:
        return len([p for p in self.save_points if p > step])

    def fits(self, now: float, saves_left: int) -> int:
        """Steps that still fit before `stop_at` at the measured step and save times."""
        return steps_that_fit(now, self.stop_at, self.per_step, saves_left, self.save_s)

    def cap(self, step: int, fits: int, this_step_saves: bool) -> bool:
        """Caps the plan at `fits` more steps; the save points are spread again over it. With
        `this_step_saves` (the caller checks for a save after re-planning), `step` itself stays
        or becomes a save point; else points start at the next step. True when it capped."""
        if step + fits >= self.total:
            return False
        self.total = max(step, step + fits)
        if this_step_saves:
            kept = {p for p in self.save_points if p <= step}
            self.save_points = kept | spread(self.total, self.saves, step)
        else:
            self.save_points = spread(self.total, self.saves, step + 1)
        return True

    # -- stopping --------------------------------------------------------------------------
    def out_of_time(self, now: float, step_s: float = 0.0) -> bool:
        """One more step of `step_s` and a save would end past `stop_at`."""
        return bool(self.stop_at) and now + self.save_s + step_s >= self.stop_at
