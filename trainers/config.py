"""Training configuration: one dataclass, recorded with every job as its hyperparameters.

It checks itself on construction (and on every `dataclasses.replace`): a bad value fails in the
driver with the field's name, not minutes later inside a Ray worker.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

METHODS = ("lora", "full", "last_layers")
# the task types with a recipe (trainers/launch.py RECIPES must cover exactly these)
TASK_TYPES = ("InstructTextTask", "ChatTask", "DpoTask", "GrpoTask")


@dataclass
class GrpoSettings:
    """The GRPO recipe's knobs (trainers/grpo.py); None: the recipe's default for the device
    (grpo.DEFAULTS, shorter completions on CPU)."""
    prompts_per_step: int | None = None
    max_completion_length: int | None = None
    dev_prompts: int | None = None
    dev_max_completion: int | None = None
    beta: float | None = None            # KL weight (the validator's BETA_GRPO)
    num_generations: int | None = None   # completions per prompt (the validator's 2)
    compiled_decode: bool | None = None  # generation under CUDA graphs, static cache (decoding.py); None: on
    sandbox: dict = field(default_factory=dict)  # reward_sandbox.SandboxLimits overrides

    def __post_init__(self):
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name == "beta" else 1
            if f.name == "sandbox":
                continue
            if f.name == "compiled_decode":
                if value not in (None, True, False):
                    raise ValueError(f"TrainConfig.grpo.compiled_decode must be None (on), true or false, got {value!r}")
                continue
            if value is not None and not (isinstance(value, (int, float)) and value >= least):
                raise ValueError(f"TrainConfig.grpo.{f.name} must be None (the default) or >= {least}, got {value!r}")


@dataclass
class TrainConfig:
    # what to train
    model_path: str                    # local directory of the base model
    train_file: str                    # the task's training JSON (array of records)
    dataset_type: dict                 # the validator's dataset_type object
    task_type: str = "InstructTextTask"
    # where
    run_dir: str = "/tmp/miner-runs"   # Ray Train storage_path (shared storage on multi-node)
    run_name: str = "ft"               # stable per job: a rerun resumes
    # method
    method: str = "lora"               # "lora" | "full" | "last_layers" (full FT of the last `last_layers`)
    last_layers: int = 2               # decoder layers trained by method="last_layers" (+ the final norm)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"
    lora_rslora: bool = False          # scale alpha/sqrt(r) instead of alpha/r (rsLoRA)
    lora_dora: bool = False            # weight-decomposed LoRA (DoRA): slower per step
    lora_mlp_r: int = 0                # rank of the MLP projections (0: lora_r); alpha keeps alpha/r
    lora_layer_rank: str = ""          # "probe": rank per layer from its gradient norm (layerwise.py), mean lora_r
    probe_batches: int = 4             # micro-batches the rank probe measures
    zero_stage: int = 0                # 3: DeepSpeed ZeRO-3 over the workers (engines.py): weights, grads and
                                       # optimizer state sharded, for models whose training state outgrows a GPU
    # optimisation
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    epochs: float = 3.0
    batch_tokens: int = 8192           # padded tokens per micro-batch per worker
    max_batch: int = 32
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    fp32_master: bool = True           # bf16 weights (full FT on a GPU): AdamW steps their fp32 values (weight + bf16 residual), when they fit
                                       # (trainers/master_weights.py: bf16 rounds most full-FT updates away)
    max_seq_len: int | None = None     # None: the validator's evaluation length
    kl_coef: float = 0.0               # a KL-weighted Instruct task (USE_KL/KL_COEF): train, evaluate and select on
                                       # CE + kl_coef x mean KL(model || base) over label tokens, as it is scored
    dpo_label_smoothing: float = 0.0   # DPO: train on (1-e) x the pair's loss + e x the loss of the swapped pair
                                       # (cDPO); the dev metric and selection stay the validator's plain loss
    dpo_shrink: bool = False           # DPO full fine-tune: publish base + a x (tuned - base) for the a in dpo_shrink.ALPHAS
                                       # whose dev pairs give the surest gain over the base (the boss round's bound)
    # selection and deadline
    dev_fraction: float = 0.05
    max_dev_rows: int = 256
    train_deadline: float = 0.0        # unix time at which training must stop (0: no deadline)
    saves: int = 4                     # evaluate dev loss and checkpoint this many times
    early_save: bool = False           # one more checkpoint right after the probe steps (tournament: the
                                       # output folder holds a model from then on, whenever the kill comes)
    eval_share: float = 0.0            # > 0: fewer saves when they would take more of the window than this
    max_steps: int = 0                 # cap on optimizer steps (0: none), e.g. a reference miner's 10
    keep_base: bool = True             # the starting weights are a candidate: never publish worse on dev
    base_margin_se: float = 2.0        # ...and are replaced only when beaten by > this many paired SEs (averaging)
    # weight averaging and validation-driven adjustments (averaging.py; benchmarks/results/quality.md)
    ema: bool = False                  # evaluate an EMA of the weights beside the raw ones at each save
    ema_decay: float = 0.0             # 0: from the planned steps (averaging.ema_decay)
    soup: bool = False                 # greedy soup of the saved snapshots at the end
    soup_size: int = 4                 # snapshots kept for the soup (best by dev metric)
    rollback: bool = False             # dev metric worse for `rollback_patience` saves: restore best, LR x0.5
    rollback_patience: int = 2
    max_rollbacks: int = 2
    dev_pass: bool = False             # at the end, one epoch over the dev rows at lr x dev_pass_lr_ratio
    dev_pass_lr_ratio: float = 0.25
    seed: int = 42
    order_seed: int = 0                # added to the seed of the batch order and torch's RNG only: another run of the
                                       # same recipe on the same dev split (a seed soup's member)
    soup_runs: int = 1                 # full SFT/DPO: up to this many runs of the recipe while whole ones fit the window,
                                       # averaged when dev says so (seed_soup.py); 1: one run
    # resources
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    accelerator_type: str | None = None   # the planned GPU type (cluster.planning.capacity)
    label_selector: dict = field(default_factory=dict)  # node labels the workers must run on (planned node too)
    progress_file: str = ""            # rank 0 writes live progress here (trainers/progress.py)
    cpu_threads: int = 0               # GRPO on CPU: torch threads per worker (0: the CPUs / workers)
    # recipe switches (once keys of `extra`, still accepted there: see _lift_extra)
    compile: bool = True               # torch.compile the packed SFT path (packing.py); ZeRO-3 turns it off
    packed: bool = True                # packed varlen batches on GPU when the model supports them
    search_trial: bool = False         # an ASHA trial (tuning/asha.py): metrics only, no checkpoints, no base eval
    grpo: GrpoSettings = field(default_factory=GrpoSettings)
    # records that ride with the job (the trainers never read them)
    n_params: int = 0                  # the base model's parameter count (cluster planner)
    search: dict = field(default_factory=dict)  # the hyperparameter search's brief (tuning.search)
    extra: dict = field(default_factory=dict)   # free-form records (the cluster's plan, tournament inputs)

    def __post_init__(self):
        _lift_extra(self)
        if isinstance(self.grpo, dict):  # after to_dict(): Ray hands the workers plain dicts
            self.grpo = GrpoSettings(**self.grpo)
        problems = _problems(self)
        if problems:
            raise ValueError(f"TrainConfig.{problems[0]}")

    def to_dict(self) -> dict:
        return asdict(self)


_GRPO_KEYS = {f.name for f in fields(GrpoSettings)}


def _lift_extra(cfg: TrainConfig) -> None:
    """Keys of `extra` that are now typed fields move to them (an `extra` written before, or by a
    caller not yet changed, keeps working); the rest stay in `extra`."""
    if not cfg.extra:
        return
    own = {f.name for f in fields(TrainConfig)} - {"extra", "grpo"}
    rest, grpo = {}, {}
    for key, value in cfg.extra.items():
        if key in own:
            setattr(cfg, key, value)
        elif key in _GRPO_KEYS:
            grpo[key] = value
        else:
            rest[key] = value
    if grpo:
        base = asdict(cfg.grpo) if isinstance(cfg.grpo, GrpoSettings) else dict(cfg.grpo)
        cfg.grpo = {**base, **grpo}
    cfg.extra = rest


def _problems(c: TrainConfig) -> list[str]:
    """'field must be ..., got ...' for each bad value (the caller raises the first)."""
    rules = [("task_type", lambda v: v in TASK_TYPES, f"one of {TASK_TYPES}"),
             ("method", lambda v: v in METHODS, f"one of {METHODS}"),
             ("zero_stage", lambda v: v in (0, 3), "0 or 3"),
             ("lora_layer_rank", lambda v: v in ("", "probe"), "'' or 'probe'"),
             ("max_seq_len", lambda v: v is None or v >= 1, "None or >= 1")]
    rules += [(name, lambda v: v > 0, "> 0") for name in ("lr", "epochs", "batch_tokens", "cpus_per_worker")]
    rules += [(name, lambda v: v >= 1, ">= 1") for name in (
        "last_layers", "lora_r", "probe_batches", "max_batch", "grad_accum", "saves", "soup_size", "rollback_patience",
        "soup_runs")]
    rules += [(name, lambda v: v >= 0, ">= 0") for name in (
        "lora_alpha", "lora_mlp_r", "weight_decay", "max_grad_norm", "kl_coef", "max_dev_rows", "train_deadline",
        "max_steps", "base_margin_se", "max_rollbacks", "num_workers", "cpu_threads", "n_params", "order_seed")]
    rules += [("dpo_label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5)")]
    rules += [(name, lambda v: 0 <= v <= 1, "in [0, 1]") for name in (
        "lora_dropout", "warmup_fraction", "min_lr_ratio", "dev_fraction", "eval_share", "ema_decay",
        "dev_pass_lr_ratio")]
    problems = []
    for name, ok, want in rules:
        value = getattr(c, name)
        try:
            good = bool(ok(value))
        except TypeError:  # e.g. None or a string where a number belongs
            good = False
        if not good:
            problems.append(f"{name} must be {want}, got {value!r}")
    return problems
