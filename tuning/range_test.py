"""Smith's LR range test (arXiv 1506.01186, fastai `lr_find`) on the job's own model and data.

The LR grows exponentially, one optimizer step per LR, over a small cache of the job's first
training batches (collated once, replayed in order), from the job's starting weights; the
trainable weights are restored afterwards. The result is the loss-vs-LR curve and a suggested
LR, saved as JSON + PNG next to the job's outputs.

Suggestion rule: one decade below the LR at the minimum of the smoothed loss (`min/10`).
- The minimum is where the growing steps stop helping: just past it the loss turns up and then
  diverges. A schedule that *stays* at an LR for hundreds of steps must sit well inside that
  edge; Smith and fastai's original rule put it about a decade below.
- The alternatives are noisier on a short, cached sweep: the steepest-descent point depends on
  one finite difference of a noisy curve, and the minimum itself over-shoots (it is the edge).
- The rule only has to land within the ASHA search window (about +-0.6 decades, space.py), which
  then measures. benchmarks/lr_search.py records every candidate rule next to the grid's best
  LR, so the rule is checked against full runs, not taken on faith.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainers.batching import collate, make_batches, per_sample_loss, split_dev
from trainers.config import TrainConfig
from trainers.formats import tokenize_task
from trainers.master_weights import MasterAdamW, uses_master
from trainers.modeling import load_base_model, load_tokenizer, wrap_for_training
from trainers.paths import JobPaths


@dataclass
class RangeTestConfig:
    steps: int = 60                 # one LR per step
    span_decades: float = 2.0       # sweep prior/10^span .. prior*10^span
    cached_batches: int = 16        # distinct batches, replayed in order
    smoothing: float = 0.9          # EMA of the loss (bias-corrected)
    diverge_factor: float = 4.0     # stop once the smoothed loss exceeds this x its minimum
    stop_at: float | None = None    # unix time: stop sweeping (the search's time share)


@dataclass
class RangeTestResult:
    lrs: list[float]
    losses: list[float]             # relative to each cached batch's starting loss, x their mean
    smoothed: list[float]
    suggestion: float
    rule: str
    candidates: dict[str, float]
    lr_at_min: float
    diverged_at: float | None
    seconds: float
    stopped_by: str                 # "diverged" | "end" | "time"
    batches_per_epoch: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def sweep_lrs(lr_min: float, lr_max: float, steps: int) -> list[float]:
    if not (0 < lr_min < lr_max) or steps < 2:
        raise ValueError(f"need 0 < lr_min < lr_max and >= 2 steps, got {lr_min}, {lr_max}, {steps}")
    ratio = lr_max / lr_min
    return [lr_min * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float) -> list[float]:
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, dict[str, float]]:
    """The `min/10` suggestion (module docstring) and the other usual candidates, for the record."""
    if not lrs:
        raise ValueError("empty range-test curve")
    i_min = min(range(len(smoothed)), key=smoothed.__getitem__)
    logs = [math.log10(lr) for lr in lrs]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, max(1, i_min))]
    steep = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[i_min]
    candidates = {"min_over_10": lrs[i_min] / 10, "steepest": steep, "min": lrs[i_min],
                  "min_over_3": lrs[i_min] / 3}
    return candidates["min_over_10"], candidates


def lr_range_test(model, batches: list[dict], lrs: list[float], *, smoothing: float = 0.9,
                  diverge_factor: float = 4.0, max_grad_norm: float = 1.0, weight_decay: float = 0.0,
                  stop_at: float | None = None, fp32_master: bool = True) -> RangeTestResult:
    """Runs the sweep on `model` over the cached `batches` and restores its trainable weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().to("cpu", copy=True) for p in params]
    # the run's optimizer: with bf16 weights (full FT on a GPU) their fp32 values step, or small LRs look inert
    cls = MasterAdamW if uses_master(fp32_master, params, params[0].device) else torch.optim.AdamW
    optimizer = cls(params, lr=lrs[0], weight_decay=weight_decay)
    t0, losses, used, stopped_by, best = time.time(), [], [], "end", math.inf
    # Each cached batch's loss at the starting weights: the curve is loss relative to it (times
    # the mean), so a hard batch coming round does not look like a rise in the curve.
    scale = [_loss(model, b).item() for b in batches]
    mean_scale = sum(scale) / len(scale)
    model.train()
    try:
        for i, lr in enumerate(lrs):
            batch = batches[i % len(batches)]
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item() * mean_scale / max(scale[i % len(batches)], 1e-6)
            losses.append(value if math.isfinite(value) else float("inf"))
            used.append(lr)
            curve = smooth(losses, smoothing)
            best = min(best, curve[-1])
            # Diverged: worse than where it started (after a few steps of noise), or 4x its best.
            start = max(curve[:5])
            if not math.isfinite(curve[-1]) or curve[-1] > diverge_factor * best or (i >= 5 and curve[-1] > start):
                stopped_by = "diverged"
                break
            if stop_at is not None and time.time() >= stop_at:
                stopped_by = "time"
                break
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s.to(p.device))
        optimizer.zero_grad(set_to_none=True)
    curve = smooth(losses, smoothing)
    finite = [i for i, v in enumerate(curve) if math.isfinite(v)] or [0]
    suggestion, candidates = suggest([used[i] for i in finite], [curve[i] for i in finite])
    i_min = min(finite, key=curve.__getitem__)
    return RangeTestResult(lrs=used, losses=losses, smoothed=curve, suggestion=suggestion, rule="min_over_10",
                           candidates=candidates, lr_at_min=used[i_min],
                           diverged_at=used[-1] if stopped_by == "diverged" else None,
                           seconds=round(time.time() - t0, 2), stopped_by=stopped_by)


def _loss(model, batch: dict) -> torch.Tensor:
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_loss(logits, batch["labels"]).mean()


def cached_batches(cfg: TrainConfig, tokenizer, model_config, n: int, device) -> tuple[list[dict], int]:
    """The first `n` batches of the job's training shard, in the order the trainer sees them
    (same rendering and length, dev split, seed and batching), collated once; and the batches per epoch."""
    rows = json.loads(Path(cfg.train_file).read_text())
    examples = tokenize_task(cfg.task_type, rows, cfg.dataset_type, tokenizer, model_config, cfg.max_seq_len,
                             log=lambda *_: None).examples
    train, _ = split_dev(examples, cfg.dev_fraction, cfg.max_dev_rows, cfg.seed)
    batches = make_batches(train, cfg.batch_tokens, cfg.max_batch, cfg.seed)
    return [collate(b, tokenizer.pad_token_id, device) for b in batches[:n]], len(batches)


def run_range_test(cfg: TrainConfig, out_dir: Path, prior_lr: float, rt: RangeTestConfig | None = None,
                   device: str | None = None) -> RangeTestResult:
    """The job-level entry point: load the job's model and data, sweep around `prior_lr`,
    write range_test.json and range_test.png into `out_dir`."""
    rt = rt or RangeTestConfig()
    dev = torch.device(device or ("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_path)
    base = load_base_model(cfg.model_path, dev)
    batches, per_epoch = cached_batches(cfg, tokenizer, base.config, rt.cached_batches, dev)
    model = wrap_for_training(base, cfg).to(dev)
    span = 10 ** rt.span_decades
    lrs = sweep_lrs(prior_lr / span, min(1.0, prior_lr * span), rt.steps)
    result = lr_range_test(model, batches, lrs, smoothing=rt.smoothing, diverge_factor=rt.diverge_factor,
                           max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay,
                           stop_at=rt.stop_at, fp32_master=cfg.fp32_master)
    result.batches_per_epoch = per_epoch
    result.extra = {"prior_lr": prior_lr, "method": cfg.method, "lora_r": cfg.lora_r, "device": str(dev),
                    "cached_batches": len(batches), "rows_per_batch": round(sum(
                        int(b["input_ids"].shape[0]) for b in batches) / len(batches), 1)}
    paths = JobPaths(Path(out_dir))
    paths.job_dir.mkdir(parents=True, exist_ok=True)
    paths.range_test.write_text(json.dumps(result.to_dict(), indent=1))
    from .plots import plot_range_test

    plot_range_test(result, paths.range_test_plot)
    return result
