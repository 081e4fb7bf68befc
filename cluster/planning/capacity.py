"""Capacity planner: from a model's size and task type to a job shape and a predicted duration.

Memory (weights, gradients, optimizer states, activations; DPO/GRPO reference model, GRPO
generation) picks the method (full FT / LoRA / LoRA + ZeRO-3) and the GPU count; throughput
(tokens/s per GPU, seeded from training-recipes.md §2.3 and scaled by what the knowledge base
measured) gives the time. The plan becomes a Ray placement-group shape: `workers` bundles of
{GPU: 1, CPU: c}, STRICT_PACK on one node (jobs never span nodes: at most one node's GPUs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

from cluster.plan import Plan
from tuning.priors import param_count_from_config

GIB = 1024**3
# Bytes per parameter of the training state. A full fine-tune is only planned with fp32 master
# weights (trainers/master_weights.py: bf16 weight 2 + grad 2, bf16 residual 2, fp32 AdamW moments 8),
# because without them bf16 AdamW rounds most updates away (judge_parity.md §3); where that state
# does not fit MASTER_SHARE of one device, LoRA (fp32 adapters) is planned instead.
FULL_BYTES = 14.0       # = trainers.master_weights.MASTER_BYTES (tests/test_admission.py checks)
# the share of a device the master state may take: trainers.master_weights.STATE_SHARE, and
# trainers.grpo.GRPO_MASTER_SHARE for GRPO (its generation needs the rest)
MASTER_SHARE = {"GrpoTask": 0.25}
MASTER_SHARE_DEFAULT = 0.6
FROZEN_BYTES = 2.0      # a frozen bf16 base (LoRA, and the DPO/GRPO reference model)
LORA_FRACTION = 0.02    # r128 adapters on all linear layers: ~2% of the base, trained at 16 B/param
FULL_FT_MAX_PARAMS = 9e9  # the winner's cut: full FT up to 9 B, LoRA above (§1.6)
RUNTIME_GIB = 3.0       # CUDA context, allocator slack, NCCL buffers
GRPO_GENERATION_SHARE = 0.3  # vLLM colocate's gpu_memory_utilization (§3.9)
# Kept back from a job's window for saving, uploading and hashing, at least (see training_stop_s).
PUBLISH_RESERVE_S = 20.0
PUBLISH_RESERVE_FRACTION = 0.05

# Tokens/s per H100 ≈ C / params_B, fitted to our plain-HF measurements (§2.3):
# full 1.24 B 48 k, 3.2 B 15.7 k (≈55 k·B); frozen-base 1.24 B 60 k, 3.2 B 25 k, 7.5 B 13.3 k (≈85 k·B).
THROUGHPUT_C = {"full": 55e3, "lora": 85e3, "lora_zero3": 85e3 * 0.8}
MAX_TOKENS_PER_S = 150e3   # tiny models are bound by the logits/CE and the input pipeline
MULTI_GPU_EFFICIENCY = 0.9
# Work per trained token relative to Instruct: DPO runs chosen+rejected and a reference forward;
# GRPO is bound by generating 2 completions per prompt (§2.5).
TASK_COST = {"InstructTextTask": 1.0, "ChatTask": 1.0, "DpoTask": 2.5, "GrpoTask": 6.0}
# tournament grant multipliers (§1.1): GPUs granted by params × this
TASK_SIZE_FACTOR = {"DpoTask": 3.0, "GrpoTask": 2.0}


@dataclass(frozen=True)
class Device:
    """One kind of accelerator: memory per device and speed relative to an H100."""
    name: str
    mem_gib: float
    speed: float


DEVICES = {
    "H100": Device("H100", 80, 1.0), "H200": Device("H200", 141, 1.15),
    "A100": Device("A100", 80, 0.35), "A100-40G": Device("A100-40G", 40, 0.35),
    "L40S": Device("L40S", 48, 0.35), "A10G": Device("A10G", 24, 0.12),
    # CPU mode (tests, demo): logical workers, only tiny models; the trainer fills its window.
    "CPU": Device("CPU", 8, 0.01),
}
CPU_MAX_PARAMS = 300_000_000


def device(name: str) -> Device:
    return DEVICES.get(name) or Device(name, 80, 0.5)  # unknown GPU: assume a modest 80 GB card


@dataclass(frozen=True)
class Timing:
    """Everything around training, in seconds or bytes/s; the safety margin is added last."""
    download_fixed_s: float = 90.0        # dataset, tokenizer, configs, tokenising
    download_bps: float = 250e6           # model weights from the hub (bf16 = 2 B/param)
    load_bps: float = 1.5e9               # weights from disk into GPUs
    save_bps: float = 1.0e9
    upload_bps: float = 100e6             # the whole publish: upload, re-download and hash of the snapshot
    # Save + publish time is lognormal around the nominal (hub throttling, retries, slow disks):
    # the reserve kept back from the window is its upper quantile at z, i.e. exp(z·σ) × nominal.
    # σ and upload_bps come from the knowledge base once jobs have measured them.
    publish_sigma: float = 0.5
    publish_z: float = 4.26               # one publish in 100,000 overruns the reserve
    tuning_share: float = 0.20            # LR search budget, as the winner's (≤20% of wall clock)
    min_train_s: float = 600.0            # below this, don't bother
    min_train_tokens: float = 5e6         # enough steps at batch 64 × 2 k to move the loss
    rows: int = 100_000                   # the offer's ds_size is always a fake 100 k
    tokens_per_row: float = 300.0
    target_epochs: float = 3.0            # the recipe caps epochs at 3 (§1.6)
    margin_fraction: float = 0.10
    margin_s: float = 180.0               # the recipe's "deadline − 3 min"


GPU_TIMING = Timing()
# CPU mode: seconds-scale overheads; the deadline-capped trainer takes whatever window it gets.
CPU_TIMING = Timing(download_fixed_s=5, download_bps=50e6, load_bps=200e6, save_bps=100e6, upload_bps=50e6,
                    min_train_s=20, min_train_tokens=0, margin_s=20, margin_fraction=0.05)


def shape_from_params(params: float) -> tuple[int, int]:
    """(hidden, layers) of a typical decoder of this size (N ≈ 12·L·h², L ≈ h/128)."""
    hidden = max(256, int((params * 128 / 12) ** (1 / 3)))
    return hidden, max(2, hidden // 128)


def memory_per_gpu_gib(params: float, task_type: str, method: str, gpus: int, dev: Device,
                       seq_tokens: int = 4096, vocab: int = 128_256, kl: bool = False) -> float:
    """Peak memory per device for one micro-batch of `seq_tokens`, gradient checkpointing on.
    `kl`: a KL-weighted task (a full fine-tune keeps a frozen base for the KL term)."""
    shard = gpus if method == "lora_zero3" else 1
    if method == "full":
        state = FULL_BYTES * params
        reference = FROZEN_BYTES * params if task_type in ("DpoTask", "GrpoTask") or kl else 0.0
    else:  # LoRA: the frozen base is also the reference (adapters off), so no second copy
        state = FROZEN_BYTES * params + 16.0 * LORA_FRACTION * params
        reference = 0.0
    hidden, layers = shape_from_params(params)
    pairs = 2 if task_type == "DpoTask" else 1
    # checkpointed layer inputs + one layer's live activations + fp32 logits and their grad
    act = pairs * seq_tokens * (hidden * layers * 2 + 34 * hidden + vocab * 8)
    mem = (state + reference) / shard + act + RUNTIME_GIB * GIB
    if method == "lora_zero3":
        mem += 2 * FROZEN_BYTES * params / layers  # a gathered layer (and its prefetch)
    if task_type == "GrpoTask":
        mem += GRPO_GENERATION_SHARE * dev.mem_gib * GIB
    return mem / GIB


def tokens_per_s(params: float, method: str, gpus: int, dev: Device, task_type: str) -> float:
    per_gpu = min(MAX_TOKENS_PER_S, THROUGHPUT_C[method] / max(params / 1e9, 0.05)) * dev.speed
    n = max(gpus, 1)
    return per_gpu * n * (MULTI_GPU_EFFICIENCY if n > 1 else 1.0) / TASK_COST.get(task_type, 1.0)


def durations(params: float, method: str, tps: float, timing: Timing) -> tuple[float, float, float]:
    """(min_s, target_s, overhead_s): download, load, tuning share, training, save, upload, margin."""
    return _durations(params, method, tps, timing)[:3]


def post_training_s(params: float, method: str, timing: Timing) -> float:
    """Kept back from the end of the window: save + publish at its high quantile, plus the margin."""
    return publish_reserve_s(publish_nominal_s(params, method, timing), timing) + timing.margin_s


def publish_nominal_s(params: float, method: str, timing: Timing) -> float:
    produced = FROZEN_BYTES * params * (1.0 if method == "full" else LORA_FRACTION)
    return produced / timing.save_bps + produced / timing.upload_bps


def publish_reserve_s(nominal_s: float, timing: Timing) -> float:
    return nominal_s * math.exp(timing.publish_z * timing.publish_sigma)


def training_stop_s(post_s: float, budget_s: float) -> float:
    """How long before the end of its window a job stops training to save and publish (job_main):
    the plan's reserve, and never less than a share of the window for short CPU jobs."""
    return max(PUBLISH_RESERVE_S + PUBLISH_RESERVE_FRACTION * budget_s, post_s)


def _durations(params: float, method: str, tps: float, timing: Timing) -> tuple[float, float, float, float]:
    weights = FROZEN_BYTES * params
    pre = timing.download_fixed_s + weights / timing.download_bps + weights / timing.load_bps
    post = post_training_s(params, method, timing)
    min_train = max(timing.min_train_s, timing.min_train_tokens / tps)
    target_train = max(min_train, timing.rows * timing.tokens_per_row * timing.target_epochs / tps)

    def total(train: float) -> float:
        # the job stops training post_s before its window ends (job_main), so the window holds it whole
        return (pre + train / (1 - timing.tuning_share)) * (1 + timing.margin_fraction) + post

    return total(min_train), total(target_train), pre + post, post


def preferred_gpus(params: float, task_type: str, use_kl: bool = False) -> int:
    """G.O.D's own grant (gradients-protocol.md §13, validator/tournament/gpu_requirements.py):
    params_B × (DPO 3, GRPO 2, a KL-weighted task 2, else 1): ≤4 → 1, ≤12 → 2, ≤40 → 4, else 8."""
    factor = TASK_SIZE_FACTOR.get(task_type, 2.0 if use_kl else 1.0)
    b = params / 1e9 * factor
    return 1 if b <= 4 else 2 if b <= 12 else 4 if b <= 40 else 8


def plan_options(params: int, task_type: str, gpu_type: str, max_gpus: int, *, cpu_workers: int = 1,
                 cpus_per_worker: float = 1.0, speedup: float = 1.0, timing: Timing | None = None) -> list[Plan]:
    """Shapes that fit one node of `gpu_type` with `max_gpus` devices, preferred first (G.O.D's
    grant when it fits), then fewer GPUs down to the memory minimum. Empty: does not fit.
    `speedup` is measured/predicted throughput from the knowledge base."""
    dev = device(gpu_type)
    if gpu_type == "CPU":
        if params > CPU_MAX_PARAMS:
            return []
        tps = tokens_per_s(params, "lora", 1, dev, task_type) * speedup
        lo, hi, over = durations(params, "lora", tps, timing or CPU_TIMING)
        t = timing or CPU_TIMING
        return [Plan(task_type, params, "lora", "CPU", 0, cpu_workers, cpus_per_worker, 0.0, tps, lo, hi, over,
                     post_training_s(params, "lora", t), publish_nominal_s(params, "lora", t))]
    method, gmin = method_and_min_gpus(params, task_type, dev, max_gpus)
    if method is None:
        return []
    best = min(max_gpus, max(gmin, preferred_gpus(params, task_type)))
    counts = [g for g in (8, 4, 2, 1) if gmin <= g <= best]
    plans = []
    for g in counts:
        m = method  # full/LoRA fit one device (DDP over g); ZeRO-3 needs g ≥ its minimum
        tps = tokens_per_s(params, m, g, dev, task_type) * speedup
        t = timing or GPU_TIMING
        lo, hi, over = durations(params, m, tps, t)
        mem = memory_per_gpu_gib(params, task_type, m, g, dev)
        plans.append(Plan(task_type, int(params), m, gpu_type, g, g, cpus_per_worker, round(mem, 1),
                          tps, lo, hi, over, post_training_s(params, m, t), publish_nominal_s(params, m, t)))
    return plans


def method_and_min_gpus(params: float, task_type: str, dev: Device, max_gpus: int,
                        kl: bool = False) -> tuple[str | None, int]:
    """Full FT if it fits one device with fp32 master weights (≤9 B; `full_fits`), else LoRA on one
    device, else LoRA + ZeRO-3 on the fewest devices (powers of two) that fit."""
    if full_fits(params, task_type, dev, kl):
        return "full", 1
    if memory_per_gpu_gib(params, task_type, "lora", 1, dev) <= dev.mem_gib:
        return "lora", 1
    if task_type == "GrpoTask":
        return None, 0  # its trainer (TRL's GRPOTrainer in trainers/grpo.py) is not wired to ZeRO-3
    g = 2
    while g <= max_gpus:
        if memory_per_gpu_gib(params, task_type, "lora_zero3", g, dev) <= dev.mem_gib:
            return "lora_zero3", g
        g *= 2
    return None, 0


def full_fits(params: float, task_type: str, dev: Device, kl: bool = False) -> bool:
    """A full fine-tune on one device: at most 9 B, its master state within the trainer's share of
    the device (else the trainer would fall back to bf16 AdamW), and the whole step within it."""
    share = MASTER_SHARE.get(task_type, MASTER_SHARE_DEFAULT)
    return (params <= FULL_FT_MAX_PARAMS and FULL_BYTES * params <= share * dev.mem_gib * GIB
            and memory_per_gpu_gib(params, task_type, "full", 1, dev, kl=kl) <= dev.mem_gib)


def params_from_config(cfg: dict) -> int | None:
    """A parameter count from a config.json dict, None when it names no width or depth. The
    estimate itself is tuning.priors' (one formula for admission and job_main); this only reads
    the dict: a multimodal model's text_config, GPT-2's n_embd/n_layer names."""
    cfg = cfg.get("text_config", cfg)
    h, layers = cfg.get("hidden_size") or cfg.get("n_embd"), cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if not h or not layers:
        return None
    return param_count_from_config(SimpleNamespace(
        hidden_size=h, num_hidden_layers=layers, intermediate_size=cfg.get("intermediate_size"),
        vocab_size=cfg.get("vocab_size"), tie_word_embeddings=cfg.get("tie_word_embeddings", False)))


def placement(plan: Plan | None) -> dict:
    """Where a planned job runs. The driver holds no GPU (its Train workers hold the plan's
    `workers` × {GPU: 1, CPU: c}, STRICT_PACK, one node): it only asks for the planned GPU
    type's marker and, when the ledger placed it on a Ray node, that node."""
    plan = plan or Plan()
    gpu_type = plan.gpu_type
    typed = bool(plan.gpus) and gpu_type not in (None, "CPU", "GPU")
    pinned = bool(plan.pinned and plan.node_id)
    return {"driver_resources": {f"accelerator_type:{gpu_type}": 0.001} if typed else {},
            "label_selector": {"ray.io/node-id": plan.node_id} if pinned else {},
            "accelerator_type": gpu_type if typed else None}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{math.ceil(seconds / 60)} min"
