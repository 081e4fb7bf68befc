"""Tabulating benchmarks/tournament_rule.py: per task, budget and opponent the tournament rule's
numbers and verdicts (Markdown + JSON), and where ours has the lower mean loss but would not take
the task, which test samples it loses (how many, the worst gaps, the gap by sample length)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.tournament_rule import ADVANCES, CHALLENGER, DEADZONE_NATS, MIN_WIN_RATE

WORST = 5


def losing_samples(ours: dict, theirs: dict) -> dict:
    """Where ours loses against `theirs` (run records with per-example losses and token counts):
    the decided samples lost, the WORST largest losses and the gap by scored-token tercile."""
    o, t = np.asarray(ours["losses"], dtype=float), np.asarray(theirs["losses"], dtype=float)
    tokens = np.asarray(ours["tokens"])
    usable = np.flatnonzero(np.isfinite(o) & np.isfinite(t))
    gaps = t[usable] - o[usable]  # + = ours better, as the rule's gap with ours the challenger
    lost, won = gaps < -DEADZONE_NATS, gaps > DEADZONE_NATS
    worst = np.argsort(gaps, kind="stable")[:WORST]
    terciles = []
    for part in np.array_split(np.argsort(tokens[usable], kind="stable"), 3):
        if part.size:
            terciles.append({"tokens": [int(tokens[usable][part].min()), int(tokens[usable][part].max())],
                             "n": int(part.size), "ours": float(o[usable][part].mean()),
                             "theirs": float(t[usable][part].mean()), "mean_gap": float(gaps[part].mean()),
                             "won": int(won[part].sum()), "lost": int(lost[part].sum())})
    return {"lost": int(lost.sum()), "won": int(won.sum()),
            "worst": [{"index": int(usable[i]), "gap": float(gaps[i]), "ours": float(o[usable[i]]),
                       "theirs": float(t[usable[i]]), "tokens": int(tokens[usable[i]])} for i in worst],
            "terciles": terciles}


def why_not(c: dict) -> str:
    if c["decided"] == 0:
        return "draw: no sample decided"
    if c["win_rate_lb"] < MIN_WIN_RATE:
        return f"win-rate bound {c['win_rate_lb']:.1%} < {MIN_WIN_RATE:.0%}"
    if c["mean_gap_lb"] < c["required_gap"]:
        return f"mean-gap bound {c['mean_gap_lb']:.4f} < required {c['required_gap']:.4f}"
    return "worse on the scalar loss"


def analyses(comparisons: list[dict], runs: dict[tuple, dict]) -> list[dict]:
    """losing_samples for each comparison that ours wins on the mean but not under the boss rule."""
    out = []
    for c in comparisons:
        if c["ours"] < c["theirs"] and c["boss"] != ADVANCES:
            key = (c["task"], c.get("challenger", CHALLENGER), c["seed"], c["budget_s"])
            theirs = runs[(c["task"], c["opponent"], c["seed"], c["budget_s"])]
            out.append({k: c.get(k, CHALLENGER) for k in ("task", "budget_s", "seed", "challenger", "opponent")}
                       | {"why": why_not(c)}
                       | losing_samples(runs[key], theirs))
    return out


def _row(c: dict, seeds: bool) -> str:
    cells = [c["task"], f"{c['budget_s']:g}", *([str(c["seed"])] if seeds else []), c.get("challenger", "ours"),
             c["opponent"],
             f"{c['ours']:.4f} / {c['theirs']:.4f}", f"{c['decided']} of {c['n']}",
             f"{c['win_rate']:.1%} (lb {c['win_rate_lb']:.1%})", f"{c['mean_gap']:+.4f} (lb {c['mean_gap_lb']:+.4f})",
             f"{c['required_gap']:.4f}", c["boss"], c["knockout"]]
    return "| " + " | ".join(cells) + " |"


def markdown(comparisons: list[dict], found: list[dict], meta: dict) -> str:
    seeds = len(meta["seeds"]) > 1
    lines = [f"# The tournament rule: ours vs c_strong and b_trl at equal wall-clock"
             f" ({meta['model']}, {meta['device']})", "",
             f"- Command: `{meta['command']}`", f"- Machine: {meta['machine']}", f"- Date: {meta['date']}",
             f"- Seeds: {meta['seeds']}; budgets {', '.join(f'{b:g}' for b in meta['budgets'])} s wall-clock per run"
             f" (set-up included); {meta['rows']} training rows per task (seeded subset).",
             *([f"- Failed runs (left out): {'; '.join(meta['failed'])}"] if meta.get("failed") else []),
             "- Per-example test losses (Instruct/Chat: mean CE over a sample's label tokens; DPO: the pair's sigmoid"
             " loss at beta 0.1 vs the base). Ours is the challenger, the other the defender. Gap = theirs - ours"
             f" (+: ours better); decided: |gap| > {DEADZONE_NATS} nats. Boss round: ours advances when the 99%"
             f" bootstrap lower bounds (10,000 resamples, seed 20260808) of the share won >= {MIN_WIN_RATE:.0%} and of"
             " the mean gap >= the required gap (max(0.01, 1% of the defender's mean)), and ours is not worse"
             " on the mean."
             " Knockout: the majority of decided samples, unless the majority winner has the higher mean loss.", ""]
    header = ["task", "budget s", *(["seed"] if seeds else []), "challenger", "opponent", "mean loss ours / theirs", "decided",
              "share of decided won", "mean gap", "required gap", "boss-round verdict", "knockout verdict"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_row(c, seeds) for c in comparisons]
    lines += ["", "## Lower mean loss, yet no win under the boss rule: the samples ours loses", ""]
    if not found:
        lines.append("None: no comparison where ours has the lower mean loss and does not advance.")
    for a in found:
        seed = f", seed {a['seed']}" if seeds else ""
        lines += [f"### {a['task']}, {a['budget_s']:g} s{seed}, vs {a['opponent']} ({a['why']})", "",
                  f"- Decided samples: ours wins {a['won']}, loses {a['lost']}.",
                  "- Worst gaps (sample index in test.json order of the kept rows: gap, ours / theirs, scored tokens): "
                  + "; ".join(f"#{w['index']}: {w['gap']:+.3f} ({w['ours']:.3f} / {w['theirs']:.3f}, {w['tokens']})"
                              for w in a["worst"]), "",
                  "| scored tokens | n | ours | theirs | mean gap | won | lost |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {t['tokens'][0]}-{t['tokens'][1]} | {t['n']} | {t['ours']:.4f} | {t['theirs']:.4f} |"
                  f" {t['mean_gap']:+.4f} | {t['won']} | {t['lost']} |" for t in a["terciles"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def write(comparisons: list[dict], runs: dict[tuple, dict], meta: dict, out: str) -> int:
    found = analyses(comparisons, runs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "comparisons": comparisons, "lower_mean_no_win": found},
                                              indent=1))
    md = Path(out + ".md")
    findings = md.read_text().partition("\n## Findings")[2] if md.exists() else ""  # hand-written: kept
    md.write_text(markdown(comparisons, found, meta) + ("\n## Findings" + findings if findings else ""))
    print(md.read_text())
    return 0
