"""What the search varies, per task type: one function per type in SEARCH_SPACES.

A space function gets the job's TrainConfig (as a dict), the centre LR (the range test's
suggestion, or the prior) and the model's hidden size, and returns (param_space, first_points):
Ray Tune distributions over TrainConfig fields, plus configurations to evaluate first (the
centre itself, so the search never does worse than its own starting point unmeasured).
DPO/GRPO add their own function here (e.g. DPO beta is fixed by the validator at 0.1, so it
would search LR and rank; GRPO LR and rank, generations fixed at the validator's 2).
"""
from __future__ import annotations

from ray import tune

LORA_RANKS = (16, 32, 64, 128, 256)
LR_HALF_WIDTH = 4.0  # search centre/4 .. centre*4 (+-0.6 decades): the range test's precision


def lora_ranks(hidden_size: int | None) -> list[int]:
    """Ranks from LORA_RANKS that are below the model's width (a rank above it adds nothing)."""
    ranks = [r for r in LORA_RANKS if not hidden_size or r <= hidden_size]
    return ranks or [min(LORA_RANKS)]


def instruct_space(cfg: dict, centre_lr: float, hidden_size: int | None) -> tuple[dict, list[dict]]:
    space = {"lr": tune.loguniform(centre_lr / LR_HALF_WIDTH, centre_lr * LR_HALF_WIDTH)}
    first = {"lr": centre_lr}
    if cfg.get("method") == "lora":
        ranks = lora_ranks(hidden_size)
        space["lora_r"] = tune.choice(ranks)
        first["lora_r"] = cfg["lora_r"] if cfg.get("lora_r") in ranks else ranks[0]
    return space, [first]


SEARCH_SPACES = {"InstructTextTask": instruct_space}


def search_space(task_type: str, cfg: dict, centre_lr: float, hidden_size: int | None) -> tuple[dict, list[dict]]:
    if task_type not in SEARCH_SPACES:
        raise ValueError(f"no search space for task type {task_type!r} (have: {sorted(SEARCH_SPACES)})")
    return SEARCH_SPACES[task_type](cfg, centre_lr, hidden_size)


def apply_choice(cfg: dict, choice: dict) -> dict:
    """A TrainConfig dict with the searched values set (LoRA alpha follows the rank at 2r, as
    in priors.default_hparams, so the LR stays comparable across ranks)."""
    out = {**cfg, **{k: v for k, v in choice.items() if k in cfg}}
    if "lora_r" in choice:
        out["lora_r"] = int(choice["lora_r"])
        out["lora_alpha"] = 2 * int(choice["lora_r"])
    return out
