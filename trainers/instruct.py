"""The Instruct recipe: runs inside every Ray Train (TorchTrainer) worker.

Trains on exactly the text the validator scores (see instruct_format.py) with a per-sample
loss equal to its metric, on a schedule planned from the wall-clock budget: after a few
probe steps the total step count is capped so that training ends by `train_deadline`, and
the cosine schedule is stretched over the steps that will really happen.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

import ray.train
import torch
import torch.distributed as dist

from .batching import collate, make_batches, per_sample_loss, split_dev
from .config import TrainConfig
from .instruct_format import eval_sequence_length, tokenize_rows
from .modeling import load_base_model, load_tokenizer, save_trainable, wrap_for_training

PROBE_STEPS = 5


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(total * cfg.warmup_fraction))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on one: all ranks must stop on the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def dev_loss(model, dev, pad_id: int, device, batch_tokens: int) -> float | None:
    if not dev:
        return None
    model.eval()
    losses = []
    for batch in make_batches(dev, batch_tokens, 16, seed=0):
        inputs = collate(batch, pad_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        losses.extend(per_sample_loss(logits, inputs["labels"]).tolist())
    model.train()
    return sum(losses) / len(losses)


def train_loop_per_worker(config: dict) -> dict:
    cfg = TrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # OMP_NUM_THREADS wins when set (shared CPUs: spinning extra threads under load is slow).
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // max(1, world)))
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model_path)
    base = load_base_model(cfg.model_path, device)
    max_len = cfg.max_seq_len or eval_sequence_length(getattr(base.config, "max_position_embeddings", None))
    with open(cfg.train_file) as f:
        rows = json.load(f)
    examples, dropped = tokenize_rows(rows, cfg.dataset_type, tokenizer, max_len)
    train, dev = split_dev(examples, cfg.dev_fraction, cfg.max_dev_rows, cfg.seed)
    shard = train[rank::world]
    model = wrap_for_training(base, cfg)
    model.to(device)
    raw_model = model
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")

    batches_per_epoch = len(make_batches(shard, cfg.batch_tokens, cfg.max_batch, cfg.seed))
    total = max(1, int(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    if rank == 0:
        print(f"[train] rows={len(rows)} dropped_for_length={dropped} train={len(train)} dev={len(dev)} "
              f"max_len={max_len} workers={world} planned_steps={total}", flush=True)

    start = resume_step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # restarted after a failure: continue from the last reported weights
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "train_state.pt"), map_location=device, weights_only=False)
        raw_model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        resume_step, total = state["step"], state["total"]

    history: list[dict] = []
    staging = os.path.join(cfg.run_dir, cfg.run_name, "_staging", f"rank{rank}")
    save_points = {int(total * (i + 1) / cfg.saves) for i in range(cfg.saves)}
    step, epoch, micro, t0, tokens = resume_step, 0, 0, time.time(), 0
    best = {"dev_loss": None}
    model.train()
    done = False
    while not done:
        for i, batch in enumerate(make_batches(shard, cfg.batch_tokens, cfg.max_batch, cfg.seed + epoch)):
            micro += 1
            if micro <= resume_step * cfg.grad_accum:
                continue  # already trained before the restart (batch order is deterministic)
            inputs = collate(batch, tokenizer.pad_token_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            loss = per_sample_loss(logits, inputs["labels"]).mean() / cfg.grad_accum
            loss.backward()
            tokens += int(inputs["attention_mask"].sum())
            if (i + 1) % cfg.grad_accum:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step - resume_step == PROBE_STEPS and cfg.train_deadline:
                # Deadline schedule: cap the plan at what fits before the deadline.
                per_step = (time.time() - t0) / PROBE_STEPS
                fits = resume_step + PROBE_STEPS + int(max(0.0, cfg.train_deadline - time.time()) / per_step * 0.9)
                if fits < total:
                    total = max(step, fits)
                    save_points = {max(step, int(total * (k + 1) / cfg.saves)) for k in range(cfg.saves)}
                    if rank == 0:
                        print(f"[train] deadline caps the plan at {total} steps ({per_step:.2f}s/step)", flush=True)
            entry = {"step": step, "epoch": epoch, "loss": loss.item() * cfg.grad_accum,
                     "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 2),
                     "tokens_per_s": round(tokens * world / max(1e-6, time.time() - t0), 1)}
            history.append(entry)
            out_of_time = bool(cfg.train_deadline) and time.time() >= cfg.train_deadline
            done = _any_rank(step >= total or out_of_time, device)
            if rank == 0 and (step % 10 == 0 or done):
                print(f"[train] step {step}/{total} loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
                      f"{entry['tokens_per_s']:.0f} tok/s", flush=True)
            if step in save_points or done:
                entry["dev_loss"] = dev_loss(model, dev, tokenizer.pad_token_id, device, cfg.batch_tokens)
                if best["dev_loss"] is None or (entry["dev_loss"] or 0) <= best["dev_loss"]:
                    best = {"dev_loss": entry["dev_loss"], "step": step}
                _report(raw_model, optimizer, tokenizer, step, total, entry, rank, staging,
                        save=not cfg.extra.get("search_trial"))
            if done:
                break
        epoch += 1
    return {"history": history, "steps": step, "planned_steps": total, "best": best,
            "dropped_for_length": dropped, "train_rows": len(train), "dev_rows": len(dev),
            "max_len": max_len, "tokens": tokens * world, "train_seconds": round(time.time() - t0, 2)}


def _report(model, optimizer, tokenizer, step: int, total: int, metrics: dict, rank: int, staging: str,
            save: bool = True) -> None:
    """Reports metrics with a checkpoint (rank 0 writes it; every rank must call report).
    Ray Train copies the checkpoint into the run's storage during report, so the staging copy
    is removed afterwards - except in local mode (num_workers=0, no Ray), where it is the copy.
    Search trials (save=False) report metrics only: their weights are never used."""
    d = os.path.join(staging, f"step_{step:07d}")
    checkpoint = None
    if rank == 0 and save:
        save_trainable(model, tokenizer, d)
        trainable = ({k: v for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
                     if hasattr(model, "peft_config") else model.state_dict())
        torch.save({"model": trainable, "optimizer": optimizer.state_dict(), "step": step, "total": total},
                   os.path.join(d, "train_state.pt"))
        checkpoint = ray.train.Checkpoint.from_directory(d)
    ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
    if rank == 0 and ray.is_initialized():
        shutil.rmtree(d, ignore_errors=True)
