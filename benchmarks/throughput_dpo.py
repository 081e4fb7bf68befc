"""DPO speed on one GPU: pairs/s of our DPO step vs TRL's DPOTrainer, same pairs per step.

Random-initialised models of benchmarks/throughput.py's shapes; the pairs are real rows of a bench
DPO task (strings), tokenised by a real tokenizer (its ids fit every shape's vocabulary):
  ours        the engine's DPO step (trainers/dpo_packed.py): the reference log-probs precomputed
              once on the same path (timed apart as `ref_s`: a full fine-tune's by dpo.prepare,
              LoRA's with the adapter off), then per step chosen and rejected
              of all pairs packed into one row (varlen attention, compiled decoder layers), the
              head's logits for completion positions only, fused with the log-prob sums, the
              sigmoid loss at beta 0.1 and its gradient; the engine's optimizer (MasterAdamW).
  ours_padded the per-pair recipe before it (dpo.dpo_per_sample): one padded batch of 2B
              sequences, full logits, completion positions' in fp32; same optimizer.
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

from benchmarks.throughput import DEVICE, _sync, build, run_isolated, step_clock  # noqa: E402


def load_pairs(task: Path, tokenizer, config, n: int):
    """(raw rows with prompt/chosen/rejected strings for TRL, our tokenised PairExamples), the first n."""
    from trainers.formats import tokenize_task
    meta = json.loads((task / "task.json").read_text())
    rows = json.loads((task / "train.json").read_text())[:n]
    dt = meta["dataset_type"]
    raw = [{"prompt": r[dt["field_prompt"]], "chosen": r[dt["field_chosen"]], "rejected": r[dt["field_rejected"]]}
           for r in rows]
    return raw, tokenize_task("DpoTask", rows, dt, tokenizer, config).examples


def run_ours(model, cfg, examples, pad_id: int, per_step: int, warm: int, timed: int, fused: bool) -> dict:
    import torch

    from trainers.dpo import dpo_per_sample, fill_reference, precompute_for_full
    from trainers.dpo_packed import pair_fast_path
    from trainers.master_weights import adamw
    device = torch.device(DEVICE)
    used = examples[:per_step * (warm + timed)]
    batches = [used[i:i + per_step] for i in range(0, len(used), per_step)]
    t = time.perf_counter()
    if fused:  # the engine's DPO step (trainers/dpo_packed.py): packed, compiled layers, fused head
        cfg.batch_tokens = max(sum(len(ex) for ex in b) for b in batches)  # one micro-batch per step
        precompute_for_full(model, cfg, used, [], pad_id, device)  # a full fine-tune's references (dpo.prepare)
        loss_model, plan = pair_fast_path(model, cfg, device, max(len(ex) for ex in used))
        for b in batches:
            loss_model.fill_references(**plan.collate(b, pad_id, device))  # LoRA's, with the adapter off
        step_loss = lambda i: loss_model(**plan.collate(batches[i], pad_id, device))  # noqa: E731
    else:  # the per-pair recipe before: padded chosen + rejected, full logits
        fill_reference(model, used, pad_id, device)  # (LoRA: the adapter's B is zero, the base's log-probs)
        step_loss = lambda i: dpo_per_sample(model, batches[i], pad_id, device).mean()  # noqa: E731
    _sync()
    ref_s = time.perf_counter() - t
    params = [p for p in model.parameters() if p.requires_grad]
    cfg.lr = 1e-6
    optimizer = adamw(cfg, params, device)  # the engine's: fp32 master copies of a bf16 full fine-tune
    marks, losses = [], []
    for step in range(warm + timed):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            loss = step_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        _sync()
        marks.append(time.perf_counter())
    return {"pairs_per_s": per_step * timed / (marks[-1] - marks[warm - 1]), "ref_s": ref_s,
            "first_step_s": marks[0] - t - ref_s, "losses": [round(x.item(), 5) for x in losses]}


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
    model, cfg = build(name, method, min_vocab=len(tokenizer))
    n = a.pairs_per_step * (a.warm + a.timed)
    raw, examples = load_pairs(Path(a.task), tokenizer, model.config, n)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if variant in ("ours", "ours_padded"):
        r = run_ours(model, cfg, examples, tokenizer.pad_token_id, a.pairs_per_step, a.warm, a.timed,
                     fused=variant == "ours")
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
    ap.add_argument("--variants", default="trl,trl_liger,ours_padded,ours")
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
