"""The tournament run's plan for 1/2/4/8 GPUs (logical: no GPU needed), per model and task type.

    python -m benchmarks.tournament_plans [--model DIR ...] [--task-type DpoTask ...] [--gpu-gib 79.2]

Prints a Markdown table: the GPUs the validator would grant (gpu_requirements.py), then for each
GPU count the method, the workers and the planner's reason (cluster/jobs/tournament_plan.py), for the
named model folders and for real model shapes (config fields only).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoConfig

from cluster.jobs.tournament_plan import Hardware, plan_run, validator_gpus
from tuning.priors import param_count_from_config

SHAPES = {  # config.json fields of real models (no weights)
    "Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                         vocab_size=151936, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                         vocab_size=128256),
    "Qwen2.5-32B": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, intermediate_size=27648,
                        vocab_size=152064),
    "Llama-3.1-70B": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                          vocab_size=128256),
}


def rows(name: str, params: int, task_types: list[str], gpu_gib: float) -> list[str]:
    out = []
    for task in task_types:
        for gpus in (1, 2, 4, 8):
            hw = Hardware(gpus, "NVIDIA H100 80GB HBM3", gpu_gib, 24 * gpus, 110 * gpus * 1024**3,
                          (16 if gpus >= 4 else 8) * 1024**3)
            plan = plan_run(params, task, hw)
            out.append(f"| {name} | {params / 1e9:.2f} | {task} | {validator_gpus(params, task)} | {gpus} | "
                       f"{plan.method} | {plan.workers} | {'; '.join(plan.why[1:])} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="a local model folder (its config.json)")
    p.add_argument("--task-type", action="append", help="default: InstructTextTask and DpoTask")
    p.add_argument("--gpu-gib", type=float, default=79.2, help="memory per GPU (H100: 79.2)")
    p.add_argument("--shapes", action="store_true", help="also the real model shapes (0.5B to 70B)")
    args = p.parse_args(argv)
    tasks = args.task_type or ["InstructTextTask", "DpoTask"]
    lines = ["| model | params (B) | task | validator grants | GPUs seen | method | workers | why |",
             "|---|---:|---|---:|---:|---|---:|---|"]
    for m in args.model:
        lines += rows(Path(m).name, param_count_from_config(AutoConfig.from_pretrained(m)), tasks, args.gpu_gib)
    if args.shapes or not args.model:
        for name, cfg in SHAPES.items():
            lines += rows(name, param_count_from_config(AutoConfig.for_model(**cfg)), tasks, args.gpu_gib)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
