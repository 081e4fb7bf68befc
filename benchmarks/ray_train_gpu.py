"""The Instruct recipe through Ray Train on one GPU: the path a job takes (trainers.launch.fit ->
TorchTrainer -> trainers.loop.train_loop_per_worker -> trainers.packing.fast_path).
Prints the worker's plan line (packed / micro-batch tokens / checkpointing), the step log, and
the held-out validator loss of the base model and of the selected checkpoint.

  python benchmarks/ray_train_gpu.py MODEL_DIR TASK_DIR OUT_DIR [method]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ray

from trainers.config import TrainConfig
from trainers.evaluate import instruct_loss, load_submission
from trainers.launch import fit


def main(model: str, task: str, out: str, method: str = "full") -> None:
    model, task = str(Path(model).resolve()), str(Path(task).resolve())  # Ray workers run elsewhere
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = json.loads((Path(task) / "task.json").read_text())
    rows = json.loads((Path(task) / "train.json").read_text())
    held_out = json.loads((Path(task) / "test.json").read_text())[:200]
    train_file = out_dir / "train.json"
    train_file.write_text(json.dumps(rows))
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    cfg = TrainConfig(model_path=model, train_file=str(train_file), dataset_type=meta["dataset_type"],
                      run_dir=str(out_dir / "runs"), run_name="gpu", num_workers=1, use_gpu=True,
                      method=method, lr=3e-4 if method == "full" else 1e-3, epochs=2, saves=2,
                      batch_tokens=16384, train_deadline=time.time() + 150)
    t = time.time()
    outcome = fit(cfg, out_dir / "model")
    wall = time.time() - t
    ray.shutdown()
    s = outcome.summary
    base = instruct_loss(load_submission(model).cuda(), model, held_out, meta["dataset_type"])
    tuned_model = load_submission(outcome.model_dir) if method == "full" else None
    tuned = instruct_loss(tuned_model.cuda(), model, held_out, meta["dataset_type"]) if tuned_model else None
    report = {"wall_s": round(wall, 1), "steps": s["steps"], "planned_steps": s["planned_steps"],
              "train_rows": s["train_rows"], "tokens": s["tokens"], "train_seconds": s["train_seconds"],
              "best": s["best"], "last": s["history"][-1], "held_out_loss_base": base, "held_out_loss_tuned": tuned}
    print("RAYGPU " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
