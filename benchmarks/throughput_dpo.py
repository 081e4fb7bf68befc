"""DPO speed on one GPU: pairs/s of our DPO step vs TRL's DPOTrainer, same pairs per step.

Random-initialised models of benchmarks/throughput.py's shapes; the pairs are real rows of a bench
DPO task (strings), tokenised by a real tokenizer (its ids fit every shape's vocabulary):
  ours        trainers/dpo.py's step: the reference log-probs precomputed once (fill_reference, timed
              apart as `ref_s`), then per step the policy's summed completion log-probs of chosen and
              rejected (one padded batch of 2B sequences, completion logits only in fp32) and the
              sigmoid loss at beta 0.1; fused AdamW.
  trl         trl.DPOTrainer at its fastest settings on this host: precompute_ref_log_probs=True (the
              same reference pass, timed apart: the trainer's construction), bf16, beta 0.1, the
              Trainer's fused AdamW (TRL 1.16 has padding_free for DPO switched off).
  trl_liger   the same with use_liger_kernel=True (Liger's fused DPO loss and kernels).
Each variant runs in its own process (Liger patches modules in place).

  python benchmarks/throughput_dpo.py --task TASK_DIR --tokenizer TOK_DIR --cases llama1b-full,llama8b-lora \
      --variants trl,trl_liger,ours --pairs-per-step 8 --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.throughput import DEVICE, build, run_isolated, step_clock  # noqa: E402


def load_pairs(task: Path, tokenizer, config, n: int):
    """(raw rows with prompt/chosen/rejected strings for TRL, our tokenised PairExamples), the first n."""
    from trainers.formats import tokenize_task
    meta = json.loads((task / "task.json").read_text())
    rows = json.loads((task / "train.json").read_text())[:n]
    dt = meta["dataset_type"]
    raw = [{"prompt": r[dt["field_prompt"]], "chosen": r[dt["field_chosen"]], "rejected": r[dt["field_rejected"]]}
           for r in rows]
    return raw, tokenize_task("DpoTask", rows, dt, tokenizer, config).examples


def run_ours(model, examples, pad_id: int, per_step: int, warm: int, timed: int) -> dict:
    import torch

    from trainers.config import TrainConfig
    from trainers.dpo import dpo_per_sample, fill_reference
    from trainers.master_weights import adamw
    device = torch.device(DEVICE)
    t = time.perf_counter()
    fill_reference(model, examples[:per_step * (warm + timed)], pad_id, device)
    ref_s = time.perf_counter() - t
    params = [p for p in model.parameters() if p.requires_grad]
    # the engine's optimizer: fp32 master copies of a bf16 full fine-tune (trainers/master_weights.py)
    optimizer = adamw(TrainConfig(model_path="-", train_file="-", dataset_type={}, lr=1e-6), params, device)
    marks = []
    for step in range(warm + timed):
        batch = examples[step * per_step:(step + 1) * per_step]
        dpo_per_sample(model, batch, pad_id, device).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    return {"pairs_per_s": per_step * timed / (marks[-1] - marks[warm - 1]), "ref_s": ref_s}


def run_trl(model, tokenizer, raw, per_step: int, warm: int, timed: int, liger: bool) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    marks = []

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=per_step, max_steps=warm + timed, beta=0.1,
                         learning_rate=1e-6, precompute_ref_log_probs=True, use_liger_kernel=liger,
                         bf16=DEVICE == "cuda", use_cpu=DEVICE == "cpu", save_strategy="no", report_to="none",
                         logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                         max_length=None)
        t = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(raw[:per_step * (warm + timed)]),
                             processing_class=tokenizer, callbacks=[step_clock(marks)])
        ref_s = time.perf_counter() - t
        trainer.train()
    return {"pairs_per_s": per_step * timed / (marks[warm + timed - 1] - marks[warm - 1]), "ref_s": ref_s}


def run_one(case: str, variant: str, a) -> dict:
    import torch

    from trainers.modeling import load_tokenizer
    name, method = case.rsplit("-", 1)
    tokenizer = load_tokenizer(a.tokenizer)
    model, _ = build(name, method, min_vocab=len(tokenizer))
    n = a.pairs_per_step * (a.warm + a.timed)
    raw, examples = load_pairs(Path(a.task), tokenizer, model.config, n)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if variant == "ours":
        r = run_ours(model, examples, tokenizer.pad_token_id, a.pairs_per_step, a.warm, a.timed)
    else:
        r = run_trl(model, tokenizer, raw, a.pairs_per_step, a.warm, a.timed, liger=variant == "trl_liger")
    r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    r["tokens_per_pair"] = sum(len(ex) for ex in examples) / len(examples)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--cases", default="llama1b-full,llama8b-lora")
    ap.add_argument("--variants", default="trl,trl_liger,ours")
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--timed", type=int, default=5)
    ap.add_argument("--out", default=".")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(*a.one, a)), flush=True)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in a.cases.split(","):
        res = {"case": case, "device": DEVICE, "pairs_per_step": a.pairs_per_step}
        for variant in a.variants.split(","):
            one, stderr = run_isolated([sys.executable, __file__, *sys.argv[1:], "--one", case, variant],
                                       out / "dpo_log.txt", f"{case} {variant}")
            res[variant] = one or {"error": stderr[-800:]}
        with (out / "dpo_throughput.jsonl").open("a") as f:
            f.write(json.dumps(res) + "\n")
        best = max((v for v in res if v.startswith("trl") and "pairs_per_s" in res[v]),
                   key=lambda v: res[v]["pairs_per_s"], default=None)
        print(case, " | ".join(f"{v}: {x.get('pairs_per_s', 0):.1f} pairs/s (ref {x.get('ref_s', 0):.1f}s)"
                                if "error" not in x else f"{v}: {x['error'][-100:]}"
                                for v, x in res.items() if isinstance(x, dict)),
              f"| ours/trl_best {res['ours']['pairs_per_s'] / res[best]['pairs_per_s']:.2f}x"
              if best and "pairs_per_s" in res.get("ours", {}) else "", flush=True)


if __name__ == "__main__":
    main()
