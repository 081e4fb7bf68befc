"""Multi-GPU fine-tuning on one host: DeepSpeed ZeRO-3 inside Ray Train (issue #11).

Every run is the job's own path: trainers.launch.fit -> TorchTrainer (one worker per GPU) ->
trainers.loop.run_recipe -> trainers.engines (PlainEngine: one GPU or DDP; Zero3Engine).

  zero3    a random-initialised model of a real 8B shape (Llama-3.1-8B: 8.03 B parameters), full
           fine-tune, ZeRO-3 over all GPUs. Mixed-precision AdamW keeps 16 bytes a parameter
           (bf16 weights and gradients, fp32 master weights and two fp32 moments) = 128 GB: no
           single 80 GB GPU holds it. The consolidated model is reloaded with plain transformers
           on one GPU; its held-out loss must beat the random-initialised base's.
  scaling  a smaller shape (Llama-3.2-1B) for a fixed number of steps on 1 GPU (plain), on all
           GPUs with DDP and with ZeRO-3: steady-state tokens/s per GPU, and scaling efficiency
           = tokens/s on N GPUs / (N x tokens/s on 1 GPU).
Peak memory per GPU is sampled from nvidia-smi every 0.5 s.

  python -m benchmarks.multi_gpu --tokenizer DIR --task DIR --out DIR [--parts scaling,zero3]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.throughput import SHAPES


def random_model(shape: str, tokenizer_dir: Path, out: Path, device: str) -> Path:
    """A random-initialised model of `shape` (bf16, built on the GPU: seconds, not minutes), in
    a child process: this driver never holds a CUDA context the workers' memory would lose."""
    if not (out / "config.json").exists():
        child = multiprocessing.get_context("spawn").Process(target=_build, args=(shape, tokenizer_dir, out, device))
        child.start()
        child.join()
        if child.exitcode:
            raise RuntimeError(f"building the {shape} model failed (exit {child.exitcode})")
    return out


def _build(shape: str, tokenizer_dir: Path, out: Path, device: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = dict(SHAPES[shape])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec["vocab_size"] = max(spec["vocab_size"], len(tokenizer))  # every token id must have a row
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


class GpuMemory:
    """Peak used memory per GPU (MiB), from nvidia-smi sampled in the background."""

    def __init__(self, log: Path):
        self.log = log
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=open(log, "w"), stderr=subprocess.DEVNULL)

    def peak(self) -> dict[int, int]:
        peaks: dict[int, int] = {}
        for line in self.log.read_text().splitlines() if self.log.exists() else []:
            i, used = (int(x) for x in line.split(","))
            peaks[i] = max(peaks.get(i, 0), used)
        return peaks

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()


def steady_tokens_per_s(history: list[dict]) -> float:
    """Tokens/s over the second half of the steps (history's counters are cumulative): compile
    and allocator warm-up are left out, later recompiles and stalls are not."""
    first, last = history[len(history) // 2], history[-1]
    done = lambda e: e["tokens_per_s"] * e["elapsed_s"]
    return (done(last) - done(first)) / max(1e-9, last["elapsed_s"] - first["elapsed_s"])


def train(model: Path, task: Path, out: Path, name: str, workers: int, zero_stage: int, gpu: bool,
          steps: int, batch_tokens: int, lr: float, budget_s: float, compile_layers: bool = True) -> dict:
    from trainers.config import TrainConfig
    from trainers.launch import fit

    meta = json.loads((task / "task.json").read_text())
    cfg = TrainConfig(model_path=str(model), train_file=str(task / "train.json"), dataset_type=meta["dataset_type"],
                      run_dir=str(out / "runs"), run_name=name, method="full", zero_stage=zero_stage,
                      num_workers=workers, use_gpu=gpu, cpus_per_worker=2 if gpu else 1, max_steps=steps,
                      saves=1, lr=lr, warmup_fraction=0.1, batch_tokens=batch_tokens,
                      train_deadline=time.time() + budget_s, compile=compile_layers)
    memory = GpuMemory(out / f"{name}.nvsmi.csv")
    t = time.time()
    try:
        outcome = fit(cfg, out / f"{name}-model")
    finally:
        memory.stop()
    s = outcome.summary
    tps = steady_tokens_per_s(s["history"])
    row = {"run": name, "gpus": workers if gpu else 0, "workers": workers, "zero_stage": zero_stage,
           "steps": s["steps"], "wall_s": round(time.time() - t, 1), "train_s": s["train_seconds"],
           "tokens_per_s": round(tps, 1), "tokens_per_s_per_gpu": round(tps / workers, 1),
           "first_loss": s["history"][0]["loss"], "last_loss": s["history"][-1]["loss"],
           "dev_loss": s["best"].get("dev_loss"), "peak_mib_per_gpu": memory.peak(),
           "model_dir": str(outcome.model_dir),
           "history": [[e["step"], e["elapsed_s"], e["tokens_per_s"], round(e["loss"], 4)] for e in s["history"]]}
    print("ROW " + json.dumps(row), flush=True)
    return row


def held_out_loss(model_dir: Path, base: Path, task: Path, device: str, rows: int = 64) -> float:
    """The validator's loss of a saved model, loaded the way the validator loads it (no DeepSpeed)."""
    from trainers.evaluate import instruct_loss, load_submission

    meta = json.loads((task / "task.json").read_text())
    model = load_submission(model_dir).to(device=device, dtype=torch.bfloat16)
    loss = instruct_loss(model, str(base), json.loads((task / "test.json").read_text())[:rows], meta["dataset_type"])
    del model
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--task", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="scaling,zero3")
    ap.add_argument("--big", default="llama8b")
    ap.add_argument("--small", default="llama1b")
    ap.add_argument("--models", type=Path, default=Path("/tmp/mg-models"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--big-steps", type=int, default=12)
    ap.add_argument("--cpu-workers", type=int, default=0, help="smoke test on CPU with this many workers")
    args = ap.parse_args()
    import ray

    gpu = args.cpu_workers == 0
    n = torch.cuda.device_count() if gpu else args.cpu_workers
    device = "cuda" if gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.splitlines()[:1] if gpu else ["cpu"]
    task, results = args.task.resolve(), {"device": name, "gpus": n, "torch": torch.__version__,
                                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    import deepspeed
    import transformers
    results.update(transformers=transformers.__version__, deepspeed=deepspeed.__version__, ray=ray.__version__)
    report = args.out / "multi_gpu.json"
    ray.init(num_cpus=os.cpu_count(), num_gpus=n if gpu else 0, include_dashboard=False)
    for part in args.parts.split(","):
        if part == "scaling":
            model = random_model(args.small, args.tokenizer, args.models / args.small, device)
            # ZeRO-3 runs uncompiled (its gather hooks break torch.compile's graphs): the like-for-like
            # baseline of the efficiency is one GPU uncompiled; the compiled one is what a 1-GPU job gets
            runs = ((f"{args.small}-1gpu-compiled", 1, 0, True), (f"{args.small}-1gpu", 1, 0, False),
                    (f"{args.small}-{n}gpu-ddp", n, 0, False), (f"{args.small}-{n}gpu-zero3", n, 3, False))
            rows = [train(model, task, args.out, name, workers, zero, gpu, args.steps, 16384, 1e-4, 300, comp)
                    for name, workers, zero, comp in runs]
            for row in rows[1:]:
                row["scaling_efficiency"] = round(row["tokens_per_s"] / (row["workers"] * rows[1]["tokens_per_s"]), 3)
            results["rows"] += rows
        elif part == "zero3":
            model = random_model(args.big, args.tokenizer, args.models / args.big, device)
            row = train(model, task, args.out, f"{args.big}-{n}gpu-zero3", n, 3, gpu, args.big_steps, 4096, 3e-4, 420)
            results["rows"].append(row)
            report.write_text(json.dumps(results, indent=1))
            ray.shutdown()  # frees the GPUs for the reload
            row["reloaded_held_out_loss"] = held_out_loss(Path(row["model_dir"]), model, task, device)
            row["base_held_out_loss"] = held_out_loss(model, model, task, device)
            print("RELOAD " + json.dumps({k: row[k] for k in ("reloaded_held_out_loss", "base_held_out_loss")}), flush=True)
        report.write_text(json.dumps(results, indent=1))
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
