"""Training throughput on one GPU: plain Hugging Face Trainer vs our fast path, in one run.

Random-initialised models with the real shapes of Llama-3.2-1B/3B, Llama-3.1-8B and
Qwen2.5-0.5B/7B (configs inline, no weights), full fine-tuning and LoRA r=128 on all linear
layers. Both paths consume the same stream of samples whose lengths (prompt and answer) are
drawn from the bench Instruct tasks, with the same samples (and so the same real tokens) per
optimizer step:
  hf   - transformers.Trainer defaults: SDPA attention, padding to the longest sample of each
         micro-batch (no length grouping), full-vocabulary logits and CE, bf16 autocast, the
         Trainer's default optimizer; micro-batch x gradient accumulation = the step's samples.
  ours - trainers.instruct.Steps on the SFT fast path (packing.py), the step of trainers/loop.py
         inside Ray Train: the step's samples packed padding-free (varlen flash attention), fused
         chunked CE on label tokens, the engine's AdamW (fp32 master weights of a bf16 full
         fine-tune), regionally compiled decoder layers, micro-batch from the memory plan, the next
         micro-batch collated while the GPU runs one, one wait for the GPU per step.
tokens/s counts real (non-pad) tokens. MFU = tokens/s * F / 989.4e12 (H100 SXM dense bf16) with
  F = 6N + 12*L*d_attn*s_eff             (full fine-tuning)
  F = 4N + 6*N_adapter + 12*L*d_attn*s_eff (LoRA: frozen base, no weight grads)
N = matmul parameters (all projection layers + lm_head), s_eff = sum(s^2)/sum(s) over samples
(PaLM's attention term at each sample's own length). Both paths get the same F per token.

  python benchmarks/throughput.py lengths --out lengths.json      # once, where ../shared is
  python benchmarks/throughput.py run --lengths lengths.json --cases llama1b-full,llama8b-lora --out DIR
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEAK_FLOPS = 989.4e12
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" only for a smoke test of the script (shape "tiny")
LLAMA = dict(model_type="llama", vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
             num_key_value_heads=8, rms_norm_eps=1e-5, hidden_act="silu")
SHAPES = {
    "llama1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, head_dim=64, tie_word_embeddings=True),
    "llama3b": dict(LLAMA, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                    num_attention_heads=24, head_dim=128, tie_word_embeddings=True),
    "llama8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, head_dim=128, tie_word_embeddings=False),
    "qwen0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny": dict(LLAMA, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "qwen7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
}
# HF micro-batch (samples) that fits padded to the longest length, and accumulation steps:
# samples per optimizer step = micro x accum, the same for both paths.
HF_MICRO = {"tiny": (4, 2), "llama1b": (24, 5), "llama3b": (12, 10), "llama8b": (8, 9), "qwen0.5b": (16, 8), "qwen7b": (8, 9)}
CASES = ["llama1b-full", "llama8b-lora", "llama1b-lora", "qwen0.5b-full", "qwen0.5b-lora",
         "llama3b-full", "llama3b-lora", "qwen7b-lora"]


def _sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_gib() -> float:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


def step_clock(marks: list):
    """A Trainer callback that appends the time at the end of each optimizer step (the device
    synced first): every Trainer-based path of the benchmarks is timed by it."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _sync()
            marks.append(time.perf_counter())
    return Clock()


def _reset_peak():
    import torch
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------ lengths from the bench data
def make_lengths(out: str) -> None:
    """(length, prompt length) of every row of the bench Instruct tasks, tokenised as the
    validator does (small-llama tokenizer); only these numbers leave the bench folder."""
    from transformers import AutoTokenizer

    from trainers.instruct_format import IGNORE, tokenize_rows
    bench = Path(__file__).resolve().parents[1].parent / "shared" / "bench"
    tok = AutoTokenizer.from_pretrained(bench / "models" / "small-llama")
    pairs = []
    for task in sorted((bench / "tasks").glob("instruct_*")):
        meta = json.loads((task / "task.json").read_text())
        rows = json.loads((task / "train.json").read_text())
        examples, _ = tokenize_rows(rows, meta["dataset_type"], tok, 4096)
        pairs += [[len(e), sum(1 for x in e.labels if x == IGNORE)] for e in examples]
    Path(out).write_text(json.dumps({"source": "bench instruct_* tasks, small-llama tokenizer", "pairs": pairs}))
    print(f"{len(pairs)} samples, mean length {statistics.mean(p[0] for p in pairs):.1f}")


def sample_stream(pairs, n: int, vocab: int, seed: int):
    from trainers.instruct_format import IGNORE, Example
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length, prompt = rng.choice(pairs)
        ids = [rng.randrange(100, vocab) for _ in range(length)]
        out.append(Example(ids, [IGNORE if t < prompt else x for t, x in enumerate(ids)]))
    return out


# ------------------------------------------------------------------ models and FLOPs
def build(name: str, method: str, min_vocab: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainers.config import TrainConfig
    from trainers.modeling import wrap_for_training
    shape = dict(SHAPES[name])
    shape["vocab_size"] = max(shape["vocab_size"], min_vocab)  # room for a real tokenizer's ids (the tiny shape)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    cfg = TrainConfig(model_path="-", train_file="-", dataset_type={}, method=method, lora_r=128, lora_alpha=256)
    return wrap_for_training(model, cfg), cfg


def flops_per_token(name: str, method: str, model, s_eff: float) -> tuple[float, dict]:
    c = SHAPES[name]
    d, L, ff, h = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or d // h
    kv = c["num_key_value_heads"]
    per_layer = d * h * hd * 2 + 2 * d * kv * hd + 3 * d * ff
    n = L * per_layer + c["vocab_size"] * d
    attn = 12 * L * h * hd * s_eff
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad) if method == "lora" else 0
    f = (6 * n + attn) if method == "full" else (4 * n + 6 * adapter + attn)
    # our fused loss runs the head on label tokens only: per non-label token it skips the head's
    # forward and backward (6Vd full FT, 4Vd with the head frozen)
    head_skipped = (6 if method == "full" else 4) * c["vocab_size"] * d
    return f, {"N_matmul": n, "N_adapter": adapter, "attn_flops_per_token": attn, "s_eff": s_eff,
               "head_flops_per_token": head_skipped}


# ------------------------------------------------------------------ the two paths
def correctness(model, samples, device) -> dict:
    """Per label-token CE of the plain HF padded forward vs our packed path, same weights, bf16."""
    import torch

    from trainers.batching import per_sample_loss
    from trainers.instruct_format import IGNORE
    from trainers.packing import CausalLMLoss, collate_packed, collate_padded, enable_packed_attention, hf_model_of
    hf = hf_model_of(model)
    padded = collate_padded(samples, 0, device)
    labels = torch.full_like(padded["input_ids"], IGNORE)
    for row, ex in enumerate(samples):
        labels[row, :len(ex)] = torch.tensor(ex.labels)
    model.eval()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        ref_metric = float(per_sample_loss(logits, labels).mean())
        flat = labels[:, 1:].reshape(-1)
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), flat,
                                                ignore_index=IGNORE, reduction="none")[flat != IGNORE]
        del logits
        enable_packed_attention(hf)
        loss_model = CausalLMLoss(model)
        packed = collate_packed(samples, device)
        ours = loss_model.token_losses(**packed)
        ours_metric = float(loss_model(**packed))
    hf.set_attn_implementation("sdpa")
    model.train()
    diff = (ours - ref).abs()
    return {"tokens": int(ref.numel()), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "mean_token_loss_hf": float(ref.mean()), "mean_token_loss_ours": float(ours.mean()),
            "metric_hf": ref_metric, "metric_ours": ours_metric,
            # bf16 tolerance (relative 1e-3..1e-2): per-token and for the validator's metric
            "ok": bool(diff.mean() < 1e-2 * ref.abs().mean() and abs(ours_metric - ref_metric) < 1e-2 * abs(ref_metric))}


def run_hf(model, samples, micro: int, accum: int, warm: int, timed: int, tmp: str, grouped: bool = False) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from trainers.instruct_format import IGNORE
    counts, marks = [], []

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        counts.append((int(mask.sum()), ids.numel()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    fields = TrainingArguments.__dataclass_fields__
    sampling = ({} if not grouped else {"train_sampling_strategy": "group_by_length"}
                if "train_sampling_strategy" in fields else {"group_by_length": True})
    args = TrainingArguments(**sampling,output_dir=tmp, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                             max_steps=warm + timed, bf16=DEVICE == "cuda", use_cpu=DEVICE == "cpu", learning_rate=1e-5, save_strategy="no",
                             report_to="none", logging_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0)
    data = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in samples]
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[step_clock(marks)])
    _reset_peak()
    trainer.train()
    real = sum(c[0] for c in counts[warm * accum:(warm + timed) * accum])
    padded = sum(c[1] for c in counts[warm * accum:(warm + timed) * accum])
    secs = marks[warm + timed - 1] - marks[warm - 1]
    out = {"tokens_per_s": real / secs, "step_s": secs / timed, "peak_mem_gib": _peak_gib(),
           "padding_fraction": 1 - real / padded, "optim": str(args.optim), "micro_batch": micro, "accum": accum}
    trainer.accelerator.free_memory()
    trainer.model_wrapped = trainer.model = trainer.optimizer = None
    del trainer
    return out


def one_step(steps, batches: list, upcoming: list | None, params, optimizer) -> float:
    """The step of trainers/loop.py on one step's micro-batches; returns its loss. As the loop
    does, each next micro-batch (`upcoming`: the next step's first) is collated while the GPU runs
    the one before, and the loss is read (the step's one wait for the GPU) after the optimizer
    step is queued."""
    import torch
    for batch, after in zip(batches, batches[1:] + [upcoming]):
        loss = steps.mean_loss(steps.module, batch) / len(batches)
        loss.backward()
        if after is not None:
            steps.prefetch(after)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().item() * len(batches)


def profile_steps(out: str, step, first: int, n: int = 2) -> None:
    """n steps under torch.profiler; the kernels by total device time to OUT/profile.txt."""
    import torch
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(first, first + n):
            step(i)
        _sync()
    key = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "profile.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))


def run_ours(model, cfg, samples, per_step: int, warm: int, timed: int, compile_: bool,
             profile: str | None = None) -> dict:
    import torch

    from trainers.instruct import SFT, Steps
    from trainers.master_weights import adamw
    device = torch.device(DEVICE)
    cfg.compile = compile_
    cfg.batch_tokens = sum(len(ex) for ex in samples[:per_step]) * 2  # one pack per step when memory allows
    steps = Steps(SFT, model, cfg, device, 0, max(len(ex) for ex in samples))  # the engine's fast path
    plan = steps.plan
    params = [p for p in model.parameters() if p.requires_grad]
    cfg.lr = 1e-5
    optimizer = adamw(cfg, params, device)  # the engine's: fp32 master copies of a bf16 full fine-tune
    chunks = [samples[i * per_step:(i + 1) * per_step] for i in range(warm + timed)]
    batches = [steps.batches(chunk, seed=i) for i, chunk in enumerate(chunks)]
    step = lambda i: one_step(steps, batches[i], batches[i + 1][0] if i + 1 < len(batches) else None,  # noqa: E731
                              params, optimizer)
    _reset_peak()
    marks, real, micro_batches, first_compile = [], 0, 0, None
    for i in range(warm + timed):
        t = time.perf_counter()
        last_loss = step(i)
        _sync()
        marks.append(time.perf_counter())
        if i == 0:
            first_compile = marks[0] - t
        if i >= warm:
            real += sum(len(ex) for ex in chunks[i])
            micro_batches += len(batches[i])
    secs = marks[-1] - marks[warm - 1]
    out = {"tokens_per_s": real / secs, "step_s": secs / timed, "peak_mem_gib": _peak_gib(),
           "plan_tokens": plan.batch_tokens, "checkpointing": plan.checkpointing, "compile": compile_,
           "micro_batches_per_step": micro_batches / timed, "first_step_s": first_compile, "last_loss": last_loss}
    if profile:  # where the step's time goes: the first timed steps' samples again, under the profiler
        try:
            profile_steps(profile, step, warm, n=min(2, timed))
        except Exception as e:  # the measurement above stands without it
            out["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def run_case(case: str, lengths: str, warm: int, timed: int, variants: list[str], profile: str | None = None) -> dict:
    import tempfile

    import torch
    import transformers

    from benchmarks.throughput_trl import TRL_VARIANTS, run_trl
    name, method = case.rsplit("-", 1)
    pairs = json.loads(Path(lengths).read_text())["pairs"]
    micro, accum = HF_MICRO[name]
    per_step = micro * accum
    model, cfg = build(name, method)
    samples = sample_stream(pairs, per_step * (warm + timed), SHAPES[name]["vocab_size"], seed=1)
    s = [len(ex) for ex in samples]
    fpt, flops = flops_per_token(name, method, model, sum(x * x for x in s) / sum(s))
    result = {"case": case, "model": name, "method": method, "samples_per_step": per_step,
              "real_tokens_per_step": sum(s) / (warm + timed), "flops": flops, "flops_per_token": fpt,
              "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__}
    label_share = sum(sum(1 for x in ex.labels if x != -100) for ex in samples) / sum(s)
    result["label_share"] = label_share
    if "ours" in variants or "ours_eager" in variants:
        result["check"] = correctness(model, samples[:64], torch.device(DEVICE))
    for variant in variants:
        try:
            if variant in ("hf", "hf_grouped"):
                with tempfile.TemporaryDirectory() as tmp:
                    r = run_hf(model, samples, micro, accum, warm, timed, tmp, grouped=variant == "hf_grouped")
            elif variant in TRL_VARIANTS:
                with tempfile.TemporaryDirectory() as tmp:
                    r = run_trl(model, samples, per_step, warm, timed, tmp, variant, DEVICE)
            else:
                r = run_ours(model, cfg, samples, per_step, warm, timed, compile_=variant == "ours",
                             profile=profile and f"{profile}/{case}-{variant}")
        except torch.OutOfMemoryError as e:
            r = {"error": f"OOM: {str(e)[:200]}"}
        except Exception as e:  # one broken variant must not lose the others
            import traceback
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if "tokens_per_s" in r:
            r["mfu"] = r["tokens_per_s"] * fpt / PEAK_FLOPS
            # by FLOPs actually run: ours skips the head on non-label tokens, the others compute every logit
            run_fpt = fpt - (1 - label_share) * flops["head_flops_per_token"] if variant.startswith("ours") else fpt
            r["mfu_run"] = r["tokens_per_s"] * run_fpt / PEAK_FLOPS
        result[variant] = r
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return result


def run_isolated(cmd: list[str], log: Path, title: str, stdout_tail: int = 8000) -> tuple[dict | None, str]:
    """`cmd` (a benchmark's `--one` run of one case and variant) in its own process, its output
    appended to `log`: the dict of its last RESULT line (None when it printed none) and its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    with log.open("a") as f:
        f.write(f"=== {title}\n{proc.stdout[-stdout_tail:]}\n{proc.stderr[-8000:]}\n")
    lines = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return (json.loads(lines[-1]) if lines else None), proc.stderr


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
    from benchmarks.throughput_report import VARIANTS, report, summary_line
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("lengths")
    lp.add_argument("--out", required=True)
    rp = sub.add_parser("run")
    rp.add_argument("--lengths", required=True)
    rp.add_argument("--cases", default=",".join(CASES))
    rp.add_argument("--variants", default="hf,trl_sdpa,trl_flex,trl_sdpa_liger,ours",
                    help=", ".join(VARIANTS) + " (each in its own process; ours last by convention)")
    rp.add_argument("--warm", type=int, default=3)
    rp.add_argument("--timed", type=int, default=6)
    rp.add_argument("--out", default=".")
    rp.add_argument("--profile", default=None, help="DIR: ours's step under torch.profiler, to DIR/CASE-VARIANT/")
    rp.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    pp = sub.add_parser("report", help="markdown table from throughput.jsonl files")
    pp.add_argument("jsonl", nargs="+")
    a = ap.parse_args()
    if a.cmd == "lengths":
        return make_lengths(a.out)
    if a.cmd == "report":
        return print(report([json.loads(ln) for f in a.jsonl for ln in Path(f).read_text().splitlines()]))
    if a.one:  # a single case in this process; the driver below isolates cases (OOM, memory)
        print("RESULT " + json.dumps(run_case(a.cases, a.lengths, a.warm, a.timed, a.variants.split(","), a.profile)), flush=True)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "throughput.jsonl"
    for case in a.cases.split(","):
        t, res = time.time(), {"case": case}
        before = jsonl.read_text() if jsonl.exists() else ""
        # one process per variant: Liger patches modules in place, compilation stays with its process
        for variant in a.variants.split(","):
            one, stderr = run_isolated([sys.executable, __file__, "run", "--one", "--lengths", a.lengths, "--cases",
                                        case, "--variants", variant, "--warm", str(a.warm), "--timed", str(a.timed),
                                        *(["--profile", a.profile] if a.profile else [])],
                                       out / "log.txt", f"{case} {variant}", stdout_tail=20000)
            one = one or {variant: {"error": stderr[-1500:]}}
            res = {**one, **res, variant: one.get(variant, {"error": "no result"})}
            if "check" in one:
                res["check"] = one["check"]
            res["wall_s"] = round(time.time() - t, 1)
            # the case so far, rewritten after every variant: a run stopped at its time limit keeps what it measured
            jsonl.write_text(before + json.dumps(res) + "\n")
        print(summary_line(res), flush=True)

if __name__ == "__main__":
    main()
