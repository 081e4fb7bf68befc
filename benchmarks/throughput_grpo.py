"""GRPO speed on one GPU: optimizer steps/s (generation + scoring + update) of our recipe vs TRL's GRPOTrainer.

Random-initialised models of benchmarks/throughput.py's shapes; the prompts are the real rows of a
bench GRPO task, tokenised by a real tokenizer (its ids fit every shape's vocabulary), the same
prompts in the same order and per step for every variant. Each step: prompts_per_step prompts x
num_generations completions of exactly max_completion tokens (EOS suppressed until then through
`min_new_tokens`: a random model would otherwise stop at random times), the task's reward functions,
the reference forward (beta 0.5: KL to the base) and one update.
  ours        what trainers/grpo.py's `train` builds: its GRPOConfig arguments (grpo_args: bf16 on a
              GPU, no gradient checkpointing, beta 0.5, 2 generations, temperature 1, logging every
              step), our AdamW (fp32 master copies of the bf16 weights when they fit in
              GRPO_MASTER_SHARE of the GPU) with the warm-up + cosine LambdaLR, and the reward functions
              in the sandbox subprocess (sandbox_rewards: its IPC is part of the step). Not timed: the
              dev evaluations and checkpoints of its deadline callback.
              Generation decodes under CUDA graphs from a static cache (trainers/decoding.py), as the
              recipe does; its compile happens in the warm-up steps.
  ours_dyncache  ours generating as TRL does (dynamic cache, no compile): what the CUDA graphs give.
  ours_bf16   ours with TrainConfig.fp32_master off (torch's fused AdamW on the bf16 weights): what
              the master values cost (not a default: bf16 rounding loses most of GRPO's small updates).
  trl         trl.GRPOTrainer as a plain, speed-minded TRL user runs it: TRL's defaults (Trainer's
              fused AdamW, linear schedule, dynamic KV cache, no vLLM on this host) with the same batch
              shape, bf16, gradient_checkpointing=False (TRL defaults to True; off is its faster
              setting wherever it fits), the reward functions exec'd in-process.
  trl_liger   the same with use_liger_kernel=True. TRL 1.16's GRPO has no use_liger_loss: the flag
              only applies Liger's layer kernels (RMSNorm, RoPE, SwiGLU), its fused linear+CE is
              refused because TRL already computes log-probs through its own chunked LM head.
              Recorded as skipped where liger_kernel does not import.
The reference model of a full fine-tune is built by TRL from the policy's path, as in production:
the random model is saved to a temporary folder first. Each variant runs in its own process (Liger
patches modules in place). Timed: the optimizer steps after --warm, by a TrainerCallback at
on_step_end (device synced). trl_best = the fastest TRL variant. Any variant + `_cb` (ours_cb,
trl_cb) generates with transformers' continuous batching (TRL's use_transformers_continuous_batching).

  python benchmarks/throughput_grpo.py --task .devdata/bench/tasks/grpo_arithmetic \\
      --tokenizer .devdata/bench/models/pico-llama --cases qwen0.5b-full,llama1b-full --out DIR
  BENCH_DEVICE=cpu python benchmarks/throughput_grpo.py ... --cases tiny-full --prompts-per-step 4 \\
      --max-completion 8 --warm 1 --timed 2      # a smoke test of the script on the CPU
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.throughput import DEVICE, _peak_gib, _reset_peak, build, run_isolated, step_clock  # noqa: E402

VARIANTS = ("trl", "trl_liger", "ours", "ours_bf16", "ours_dyncache")
# a variant + this suffix generates with transformers' continuous batching (paged KV cache, CUDA
# graphs where the host has them: TRL's use_transformers_continuous_batching) instead of padded
# model.generate with a dynamic cache
CB = "_cb"
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "liger-kernel")


def counted(fn, seen: list):
    """`fn` that first records its batch's completion tokens and prompts: TRL scores each generation
    batch once per function, so wrapping one function sees what every step generated, from what."""
    def reward(completions, completion_ids=None, prompts=None, **kwargs):
        seen.append((sum(len(ids) for ids in completion_ids), prompts))
        return fn(completions=completions, completion_ids=completion_ids, prompts=prompts, **kwargs)
    reward.__name__ = fn.__name__  # TRL names its reward metrics after it
    return reward


def loss_log(losses: dict):
    """A Trainer callback keeping the logged loss of each step (both variants log every step)."""
    from transformers import TrainerCallback

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]
    return Losses()


def ours(cfg, model, rows: list[dict], steps: int, stack) -> tuple[dict, tuple, list, dict]:
    """(GRPOConfig arguments, optimizers, reward functions, notes) as trainers/grpo.py's train builds them."""
    import torch

    from trainers import grpo
    from trainers.master_weights import MasterAdamW, adamw
    g = grpo.grpo_settings(cfg, DEVICE)
    box, weights = grpo.start_sandbox(cfg, g, rows[:10])
    stack.callback(box.close)
    funcs, used = grpo.sandbox_rewards(box)
    optimizer = adamw(cfg, [p for p in model.parameters() if p.requires_grad], torch.device(DEVICE),
                      share=grpo.GRPO_MASTER_SHARE)
    scheduler = grpo.grpo_scheduler(cfg, optimizer, grpo.grpo_plan(cfg, steps))
    args = {**grpo.grpo_args(cfg, g, DEVICE), "reward_weights": [weights[i] for i in used], "seed": cfg.seed}
    return args, (optimizer, scheduler), funcs, {"optim": type(optimizer).__name__, "rewards": "sandbox",
                                                 "master_weights": isinstance(optimizer, MasterAdamW)}


def trl(cfg, liger: bool) -> tuple[dict, tuple, list, dict]:
    """The same for a plain TRL user: TRL's defaults but the batch shape, the rewards exec'd in this process."""
    from trainers.grpo import grpo_settings
    from trainers.grpo_eval import reward_sources
    from trainers.reward_sandbox_worker import load_function  # the validator's loader: first callable defined
    g = grpo_settings(cfg, DEVICE)
    sources, weights = reward_sources(cfg.dataset_type)
    args = dict(beta=g.beta, num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                per_device_train_batch_size=g.prompts_per_step * g.num_generations, learning_rate=cfg.lr,
                reward_weights=weights, seed=cfg.seed, gradient_checkpointing=False, use_liger_kernel=liger,
                use_cpu=DEVICE == "cpu", bf16=DEVICE == "cuda", logging_steps=1, save_strategy="no",
                report_to="none", disable_tqdm=True)
    return args, (None, None), [load_function(s)[0] for s in sources], {"rewards": "in-process", "liger": liger}


def run_one(case: str, variant: str, a) -> dict:
    """One variant on one case in this process: steps/s and what each step did."""
    import contextlib
    import hashlib

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trainers.config import GrpoSettings
    from trainers.grpo_eval import grpo_rows
    from trainers.modeling import load_tokenizer
    variant, cb = (variant[:-len(CB)], True) if variant.endswith(CB) else (variant, False)
    if variant == "trl_liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except Exception as e:  # not installed, or no Triton (CPU)
            return {"skipped": f"liger_kernel does not import: {type(e).__name__}: {e}"}
    name, method = case.rsplit("-", 1)
    steps = a.warm + a.timed
    task = Path(a.task)
    dt = json.loads((task / "task.json").read_text())["dataset_type"]
    rows = grpo_rows(json.loads((task / "train.json").read_text()), dt)[:a.prompts_per_step * steps]
    tokenizer = load_tokenizer(a.tokenizer)
    model, cfg = build(name, method, min_vocab=len(tokenizer))
    marks, seen, losses = [], [], {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if method == "full":  # TRL loads the KL reference from the policy's path (a LoRA one: adapter off)
            model.save_pretrained(tmp)
            model.config._name_or_path = tmp
        cfg = replace(cfg, model_path=tmp, dataset_type=dt, task_type="GrpoTask", lr=1e-6,
                      grpo=GrpoSettings(prompts_per_step=a.prompts_per_step, max_completion_length=a.max_completion))
        if variant == "ours_bf16":  # what the fp32 master values cost: ours with torch's fused bf16 AdamW
            cfg = replace(cfg, fp32_master=False)
        if variant == "ours_dyncache":
            cfg = replace(cfg, grpo=replace(cfg.grpo, compiled_decode=False))
        args, optimizers, funcs, notes = (ours(cfg, model, rows, steps, stack) if variant.startswith("ours")
                                          else trl(cfg, liger=variant == "trl_liger"))
        # equal work: every completion exactly max_completion tokens long (EOS suppressed until then)
        args.update(output_dir=os.path.join(tmp, "out"), max_steps=steps,
                    generation_kwargs={"min_new_tokens": a.max_completion})
        if cb:
            args["use_transformers_continuous_batching"] = notes["continuous_batching"] = True
        t = time.perf_counter()
        trainer = GRPOTrainer(model=model, reward_funcs=[counted(funcs[0], seen), *funcs[1:]],
                              args=GRPOConfig(**args), train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, optimizers=optimizers,
                              callbacks=[step_clock(marks), loss_log(losses)])
        if variant.startswith("ours"):
            from trainers.grpo import fast_generation, grpo_settings
            notes["compiled_decode"] = fast_generation(trainer, grpo_settings(cfg, DEVICE), tokenizer,
                                                       [r["prompt"] for r in rows], torch.device(DEVICE))
        setup_s = time.perf_counter() - t
        _reset_peak()
        t = time.perf_counter()
        trainer.train()
    secs = marks[steps - 1] - marks[a.warm - 1]
    per_step = a.prompts_per_step * args["num_generations"]
    notes.setdefault("optim", getattr(trainer.args.optim, "value", trainer.args.optim))
    return {"steps_per_s": a.timed / secs, "step_s": secs / a.timed, "completions_per_s": per_step * a.timed / secs,
            "gen_tokens_per_step": sum(n for n, _ in seen[a.warm:steps]) / a.timed, "completions_per_step": per_step,
            "peak_mem_gib": _peak_gib(), "loss_first_timed": losses.get(a.warm + 1), "setup_s": setup_s,
            "first_step_s": marks[0] - t, **notes,
            # the same prompts in the same order in every variant: compare these
            "prompts_sha1": hashlib.sha1(json.dumps([p for _, p in seen]).encode()).hexdigest()[:12],
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}


def table(results: list[dict]) -> str:
    """Markdown: every variant of every case, with ours / trl_best (the faster TRL variant)."""
    rows = ["| case | variant | steps/s | completions/s | gen tok/step | peak GiB | loss (1st timed) | vs trl_best "
            "| notes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        names = [v for v in r if _is_variant(v)]
        done = [v for v in names if v.startswith("trl") and "steps_per_s" in r[v]]
        best = max(done, key=lambda v: r[v]["steps_per_s"]) if done else None
        for v in names:
            x = r.get(v)
            if not x:
                continue
            if "steps_per_s" not in x:
                why = x.get("skipped") or x.get("error", "")[-90:]
                rows.append(f"| {r['case']} | {v} | - | - | - | - | - | - | {why!r} |")
                continue
            vs = f"{x['steps_per_s'] / r[best]['steps_per_s']:.2f}x" if best else "-"
            loss = f"{x['loss_first_timed']:.3g}" if x.get("loss_first_timed") is not None else "-"
            notes = f"{x['optim']}, rewards {x['rewards']}" + (", liger" if x.get("liger") else "") + \
                (", continuous batching" if x.get("continuous_batching") else "") + \
                (", CUDA-graph decode" if x.get("compiled_decode") else "")
            rows.append(f"| {r['case']} | {v}{' (trl_best)' if v == best else ''} | {x['steps_per_s']:.3f} | "
                        f"{x['completions_per_s']:.1f} | {x['gen_tokens_per_step']:.0f} | {x['peak_mem_gib']:.1f} | "
                        f"{loss} | {vs} | {notes} |")
    return "\n".join(rows)


def _is_variant(name: str) -> bool:
    return name.removesuffix(CB) in VARIANTS


def versions() -> dict:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, help="a bench GRPO task folder (task.json, train.json)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--cases", default="qwen0.5b-full,llama1b-full", help="SHAPE-full|lora of throughput.py's shapes")
    ap.add_argument("--variants", default="trl,trl_liger,ours")
    ap.add_argument("--prompts-per-step", type=int, default=16, help="trainers/grpo.py's default")
    ap.add_argument("--max-completion", type=int, default=256, help="tokens per completion (grpo.py's default)")
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--timed", type=int, default=5)
    ap.add_argument("--out", default=".")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.warm < 1 or a.timed < 1:
        ap.error("--warm and --timed take 1 or more: the clock starts at the end of the last warm step")
    if a.one:
        print("RESULT " + json.dumps(run_one(*a.one, a)), flush=True)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "throughput_grpo.jsonl"
    head = {"machine": platform.node(), "versions": versions(),
            "args": {k: v for k, v in vars(a).items() if k != "one"}}
    results = []
    for case in a.cases.split(","):
        before = jsonl.read_text() if jsonl.exists() else ""
        res = {"case": case, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **head}
        for variant in a.variants.split(","):
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", case, variant]
            one, stderr = run_isolated(cmd, out / "grpo_log.txt", f"{case} {variant}")
            res[variant] = one or {"error": stderr[-800:]}
            res["device"] = res.get("device") or res[variant].get("device")
            # rewritten after every variant: a run stopped at its time limit keeps what it measured
            jsonl.write_text(before + json.dumps(res) + "\n")
        results.append(res)
        print(f"{case}: " + ", ".join(f"{v} {x.get('steps_per_s', 0):.3f} steps/s" for v, x in res.items()
                                      if _is_variant(v)), flush=True)
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
