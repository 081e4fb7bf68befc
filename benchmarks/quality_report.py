"""Tabulating benchmarks/quality.py's runs: per task and config the mean and seed spread of the
validator metric, mean ratios to b/c/ours over the loss tasks, a verdict per technique, Markdown."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

RATIO_REFS = ("b_trl", "c_strong", "ours")


def summarise(runs: list[dict], order: list[str]) -> dict:
    """Per task and config: mean and spread over seeds (and mean optimizer steps); per config: the
    mean ratio to b, c and ours over the tasks scored by a loss (GRPO's score is higher-better and
    can be negative: it is compared by difference, not ratio)."""
    cells: dict = {}
    rank = {name: i for i, name in enumerate(order)}  # tasks and configs in the benchmark's order
    for r in sorted(runs, key=lambda r: (rank.get(r["task"], len(rank)), rank.get(r["config"], len(rank)))):
        cells.setdefault(r["task"], {}).setdefault(r["config"], []).append(r)
    table = {t: {c: {"mean": statistics.mean(x["test"] for x in v), "n": len(v),
                     "spread": max(x["test"] for x in v) - min(x["test"] for x in v),
                     "steps": statistics.mean(x["steps"] or 0 for x in v)} for c, v in cs.items()}
             for t, cs in cells.items()}
    higher = {r["task"]: r.get("higher_better", False) for r in runs}
    bases = {r["task"]: r["base"] for r in runs if "base" in r}
    ratios: dict = {}
    for t, cs in table.items():
        if higher[t]:
            continue
        for c, cell in cs.items():
            for ref in RATIO_REFS:
                if ref in cs:
                    ratios.setdefault(c, {}).setdefault(ref, []).append(cell["mean"] / cs[ref]["mean"])
    mean_ratio = {c: {ref: statistics.mean(v) for ref, v in rs.items()} for c, rs in ratios.items()}
    worse_than_base = sorted(f"{c} on {t}" for t, cs in table.items() for c, cell in cs.items() if t in bases
                             and abs(cell["mean"] - bases[t]) > 1e-4
                             and (cell["mean"] < bases[t] if higher[t] else cell["mean"] > bases[t]))
    return {"table": table, "mean_ratio": mean_ratio, "base": bases, "higher_better": higher,
            "worse_than_base": worse_than_base}


def verdicts(table: dict, higher: dict, names: list[str]) -> dict:
    """A technique helps on a task when it beats ours by more than the larger of the two seed
    spreads (max - min); hurts when it loses by that much; else within noise."""
    out = {}
    for name in names:
        out[name] = {}
        for t, cs in table.items():
            if name not in cs or "ours" not in cs:
                continue
            if min(cs[name]["n"], cs["ours"]["n"]) < 2:
                out[name][t] = "one seed only"
                continue
            gain = cs["ours"]["mean"] - cs[name]["mean"]
            gain = -gain if higher.get(t) else gain
            noise = max(cs[name]["spread"], cs["ours"]["spread"])
            out[name][t] = "helps" if gain > noise else "hurts" if gain < -noise else "noise"
    return out


def markdown(summary: dict, meta: dict) -> str:
    table, higher = summary["table"], summary["higher_better"]
    names = list(dict.fromkeys(c for cs in table.values() for c in cs))
    lines = [f"# Quality techniques at equal wall-clock ({meta['model']}, {meta['device']})", "",
             f"- Command: `{meta['command']}`", f"- Machine: {meta['machine']}", f"- Date: {meta['date']}",
             f"- Seeds: {meta['seeds']}; budget {meta['budget_s']} s wall-clock per run (set-up included);"
             f" {meta['rows']} training rows per task (seeded subset); total wall-clock {meta['total_s']} s.",
             *([f"- Load: {meta['load']}"] if meta.get("load") else []),
             *([f"- Failed runs (left out): {'; '.join(meta['failed'])}"] if meta.get("failed") else []),
             "- Metric: the validator's on test.json (Instruct/Chat: mean per-sample CE on labelled tokens; DPO:"
             " sigmoid DPO loss at beta 0.1 vs the base, ln 2 for the base: lower is better; GRPO: weighted reward"
             " - beta x KL(base || tuned), higher is better). Cells: mean over seeds (max - min). Ratios: mean over"
             " the loss tasks (GRPO left out: a score, not a loss).", ""]
    header = ["config"] + [t + (" (higher better)" if higher[t] else "") for t in table] + [f"/ {r}" for r in RATIO_REFS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| base model | " + " | ".join(f"{summary['base'].get(t, float('nan')):.4f}" for t in table)
                 + " |" + " |" * len(RATIO_REFS))
    for c in names:
        cells = [f"{table[t][c]['mean']:.4f} ({table[t][c]['spread']:.4f})" if c in table[t] else "-" for t in table]
        r = summary["mean_ratio"].get(c, {})
        lines.append(f"| {c} | " + " | ".join(cells) + " | " +
                     " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in RATIO_REFS) + " |")
    lines += ["", "Mean optimizer steps reached in the budget:", "",
              "| config | " + " | ".join(table) + " |", "|" + "---|" * (len(table) + 1)]
    for c in names:
        lines.append(f"| {c} | " + " | ".join(f"{table[t][c]['steps']:.0f}" if c in table[t] else "-" for t in table) + " |")
    lines += ["", "Verdict per technique vs `ours` (gain beyond the larger seed spread):", ""]
    lines += [f"- {name}: " + ", ".join(f"{t} {x}" for t, x in v.items()) for name, v in summary["verdicts"].items() if v]
    lines += ["", "Worse than the base model (mean over seeds): "
              + (", ".join(summary["worse_than_base"]) or "none")]
    return "\n".join(lines) + "\n"


def write(runs: list[dict], meta: dict, out: str, technique_names: list[str], order: list[str]) -> int:
    """`order`: task and config names in the order the tables list them."""
    summary = summarise(runs, order)
    summary["verdicts"] = verdicts(summary["table"], summary["higher_better"], technique_names)
    Path(out + ".json").write_text(json.dumps({"meta": meta, **summary, "runs": runs}, indent=1))
    md = Path(out + ".md")
    findings = md.read_text().partition("\n## Findings")[2] if md.exists() else ""  # hand-written: kept
    md.write_text(markdown(summary, meta) + ("\n## Findings" + findings if findings else ""))
    print(md.read_text())
    return 0
