"""Tables of benchmarks/throughput.py's results: every path of a case beside plain HF and TRL's best."""
from __future__ import annotations

VARIANTS = ("hf", "hf_grouped", "trl_sdpa", "trl_flex", "trl_sdpa_liger", "trl_flex_liger", "ours_eager", "ours")


def _note(v: str, x: dict) -> str:
    if v.startswith("ours"):
        return (f"1 pack of <= {x['plan_tokens']} tok, {x['micro_batches_per_step']:.2g} micro/step, "
                f"ckpt {'on' if x['checkpointing'] else 'off'}, 1st step {x['first_step_s']:.0f}s")
    if v.startswith("trl"):
        return f"packed rows of <= {x['pack_tokens']} tok, {x['attn']}, 1st step {x['first_step_s']:.0f}s"
    return f"{x['micro_batch']} x {x['accum']} samples, {100 * x['padding_fraction']:.0f}% padding"


def _paths(r: dict):
    """(variant, its result) for the paths a case ran, in the table's order."""
    return [(v, r[v]) for v in VARIANTS if r.get(v)]


def trl_best(r: dict) -> str | None:
    """The fastest TRL variant of a case (without / with Liger): the reference a speed-minded miner runs."""
    done = [v for v in VARIANTS if v.startswith("trl") and "tokens_per_s" in r.get(v, {})]
    return max(done, key=lambda v: r[v]["tokens_per_s"]) if done else None


def report(results: list[dict]) -> str:
    rows = ["| case | real tok/step | path | tokens/s | MFU | MFU (FLOPs run) | peak GiB | vs hf | vs trl_best | notes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = r.get("hf", {}).get("tokens_per_s")
        best = trl_best(r)
        ref = r[best]["tokens_per_s"] if best else None
        for v, x in _paths(r):
            if "error" in x:
                rows.append(f"| {r['case']} | | {v} | {x['error'][-60:]!r} | | | | | | |")
                continue
            ratio = f"{x['tokens_per_s'] / base:.2f}x" if base else "-"
            vs_trl = f"{x['tokens_per_s'] / ref:.2f}x" if ref else "-"
            name = f"{v} (trl_best)" if v == best else v
            rows.append(f"| {r['case']} | {r['real_tokens_per_step']:.0f} | {name} | {x['tokens_per_s']:,.0f} | "
                        f"{x['mfu']:.3f} | {x.get('mfu_run', x['mfu']):.3f} | {x['peak_mem_gib']:.1f} | {ratio} | "
                        f"{vs_trl} | {_note(v, x)} |")
    checks = ["| case | label tokens | mean abs diff | max abs diff | mean token CE hf / ours | metric hf / ours | ok |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.get("check")
        if c:
            checks.append(f"| {r['case']} | {c['tokens']} | {c['mean_abs_diff']:.4f} | {c['max_abs_diff']:.3f} | "
                          f"{c['mean_token_loss_hf']:.4f} / {c['mean_token_loss_ours']:.4f} | "
                          f"{c['metric_hf']:.4f} / {c['metric_ours']:.4f} | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(rows) + "\n\n" + "\n".join(checks)


def summary_line(r: dict) -> str:
    parts = [f"{r['case']:<14} {r.get('wall_s', 0):>5}s"]
    if r.get("check"):
        parts[0] += f" check={'ok' if r['check']['ok'] else 'FAIL'}(mean|d|={r['check']['mean_abs_diff']:.3g})"
    base = r.get("hf", {}).get("tokens_per_s")
    for v, x in _paths(r):
        if "error" in x:
            parts.append(f"{v}: {x['error'][-80:]}")
            continue
        ratio = f" x{x['tokens_per_s'] / base:.2f}" if base and v != "hf" else ""
        parts.append(f"{v}: {x['tokens_per_s']:.0f} tok/s mfu {x['mfu']:.3f}/{x.get('mfu_run', x['mfu']):.3f} "
                     f"{x['peak_mem_gib']:.1f}GiB{ratio}")
    return " | ".join(parts)
