"""The optimizer step of a bf16 full fine-tune on one GPU: what fp32 master weights cost.

On the parameters of a real shape (benchmarks/throughput.SHAPES, bf16, random gradients) it times
  adamw_bf16     - torch's fused AdamW on the bf16 weights (the floor: no master values, 14 bytes
                   of memory traffic per parameter; most full-FT updates round away)
  master_eager   - trainers.master_weights.MasterAdamW stepping eagerly (separate passes)
  master_compiled- the same, one compiled kernel per weight slice (what a GPU run uses)
and checks that the compiled step's fp32 values (weight + residual) equal the eager step's.

  python benchmarks/master_step.py --shape llama1b --steps 20 --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.throughput import SHAPES, build  # noqa: E402
from trainers.master_weights import MasterAdamW  # noqa: E402


def timed(optimizer, params, steps: int, warm: int = 3) -> float:
    """Seconds per step (after `warm` steps, which include any compilation)."""
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for _ in range(warm):
        optimizer.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def parity(params, steps: int = 3) -> float:
    """Max |eager - compiled| of the fp32 values after `steps` steps from the same start."""
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(2)]
    opts = [MasterAdamW(c, lr=1e-4, compile=flag) for c, flag in zip(copies, (False, True))]
    for step in range(steps):
        gen = torch.Generator(device=params[0].device).manual_seed(step)
        grads = [torch.randn(p.shape, device=p.device, generator=gen).to(torch.bfloat16) for p in params]
        for c, opt in zip(copies, opts):
            for p, g in zip(c, grads):
                p.grad = g
            opt.step()
    worst = 0.0
    for pe, pc in zip(*copies):
        ve = pe.detach().float() + opts[0].state[pe]["residual"].float()
        vc = pc.detach().float() + opts[1].state[pc]["residual"].float()
        worst = max(worst, float((ve - vc).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama1b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, _ = build(args.shape, "full")  # bf16, on the GPU
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    row = {"shape": args.shape, "params": n, "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    row["parity_max_abs"] = parity(params[:8])
    for name, make in [("adamw_bf16", lambda: torch.optim.AdamW(params, lr=1e-5, fused=True)),
                       ("master_eager", lambda: MasterAdamW(params, lr=1e-5, compile=False)),
                       ("master_compiled", lambda: MasterAdamW(params, lr=1e-5, compile=True))]:
        opt = make()
        row[f"{name}_ms"] = 1e3 * timed(opt, params, args.steps)
        row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "master_step.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT", json.dumps(row))


if __name__ == "__main__":
    main()
