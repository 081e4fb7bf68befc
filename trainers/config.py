"""Training configuration: one dataclass, recorded with every job as its hyperparameters."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    max_seq_len: int | None = None     # None: the validator's evaluation length
    kl_coef: float = 0.0               # a KL-weighted Instruct task (USE_KL/KL_COEF): train, evaluate and select on
                                       # CE + kl_coef x mean KL(model || base) over label tokens, as it is scored
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
    # resources
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    accelerator_type: str | None = None   # the planned GPU type (cluster.capacity)
    label_selector: dict = field(default_factory=dict)  # node labels the workers must run on (planned node too)
    progress_file: str = ""            # rank 0 writes live progress here (trainers/progress.py)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
