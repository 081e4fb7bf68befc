"""Discrete-event simulation of a week of Gradients offers against the cluster brain (no Ray).

The SAME admission and queue code as the miner (cluster.planning.admission.Admission over
cluster.planning.scheduling.Scheduler) decides every offer and dispatches every job; the simulation only
supplies the clock, the offers and how long jobs really take. Compared with the reference
miner's rule (llama in the name, < 13 h, not busy for more than an hour, one job at a time).

Trace (gradients-protocol.md §4, §9; training-recipes.md §1.3): Poisson arrivals at 1×, 10×,
100× of mainnet's ~63 jobs/week; task mix Instruct 0.125, Chat 0.125, DPO 0.10, GRPO 0.30,
Image 0.35 (declined by both: text-only miners); sizes by the annual report's shares (<1 B
37.3%, 1–7 B 29.2%, 7–40 B 31.7%, 40–70 B 0.1%, >70 B 1.8% drawn at 65–70 B), log-uniform
within a bin, 0.1–70 B; hours uniform on 1..10. Real runs differ from the plan: throughput
×lognormal(σ 0.3) (faster jobs finish their 3 epochs early and free their GPUs), save+upload
×lognormal(σ 0.5) around the plan's nominal `publish_s` (the plan's reserve `post_s`, its
1-in-100,000 quantile plus the margin, must absorb it; job_main stops training that long before
the window ends: capacity.training_stop_s).

    python benchmarks/scheduler_sim.py --out benchmarks/results/scheduler_sim
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.planning import capacity  # noqa: E402
from cluster.planning.admission import PLANNABLE, Admission, Limits, Request  # noqa: E402
from cluster.planning.ledger import parse_shape  # noqa: E402
from cluster.planning.scheduling import JOB, Item, Scheduler  # noqa: E402
from cluster.protocol.wire import TaskType  # noqa: E402

WEEK = 7 * 24 * 3600.0
T0 = 1_800_000_000.0
MAINNET_PER_WEEK = 63
TASK_MIX = [("InstructTextTask", 0.125), ("ChatTask", 0.125), ("DpoTask", 0.10), ("GrpoTask", 0.30), ("ImageTask", 0.35)]
SIZE_BINS = [((0.1e9, 1e9), 0.373), ((1e9, 7e9), 0.292), ((7e9, 40e9), 0.317), ((40e9, 70e9), 0.001),
             ((65e9, 70e9), 0.018)]
FAMILIES = [("llama", 0.35), ("qwen", 0.35), ("mistral", 0.10), ("gemma", 0.08), ("phi", 0.05), ("falcon", 0.07)]
DEBUG = False
TEXT = {"InstructTextTask", "ChatTask", "DpoTask", "GrpoTask"}


@dataclass
class Offer:
    task_id: str
    t: float
    task_type: str
    params: int
    hours: int
    model: str


def trace(load: float, seed: int) -> list[Offer]:
    rng = random.Random(seed)
    rate = MAINNET_PER_WEEK * load / WEEK
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= WEEK:
            return out
        kind = _pick(rng, TASK_MIX)
        lo, hi = _pick(rng, SIZE_BINS)
        params = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        family = _pick(rng, FAMILIES)
        out.append(Offer(f"j{len(out)}", T0 + t, kind, params, rng.randint(1, 10),
                         f"org/{family}-{params / 1e9:.1f}b"))


def _pick(rng, pairs):
    x, acc = rng.random() * sum(w for _, w in pairs), 0.0
    for value, w in pairs:
        acc += w
        if x <= acc:
            return value
    return pairs[-1][0]


@dataclass
class Stats:
    offers: int = 0
    text: int = 0
    accepted: int = 0
    missed: int = 0
    never_started: int = 0
    under_min: int = 0
    min_slack_s: float = math.inf   # the closest any finished job came to its deadline
    gpu_s: float = 0.0
    latencies_ms: list = field(default_factory=list)


def run_brain(offers: list[Offer], nodes: int, seed: int, time_decisions: bool = True) -> Stats:
    """Our control plane: every offer through Admission; accepted jobs queue and dispatch."""
    rng = random.Random(seed + 1)
    sched = Scheduler(parse_shape(f"{nodes}x8xH100"))
    adm = Admission(sched, limits=Limits(max_hours=48), supported=set(PLANNABLE))
    st, events, seq = Stats(), [], 0
    jobs: dict[str, dict] = {}
    for o in offers:
        heapq.heappush(events, (o.t, seq, "offer", o))
        seq += 1
    woken: set[float] = set()

    def dispatch(now: float) -> None:
        nonlocal seq
        for task_id in [t for t, i in sched.queue.items() if i.deadline <= now]:
            sched.finish(task_id)
            st.missed += 1
            st.never_started += 1
        for item, p in sched.due(now):
            plan = item.plan
            window = p.end - now
            if window < plan.min_s - 1:
                st.under_min += 1
                if DEBUG:
                    print("under", item.task_id, plan.gpus, plan.params, round(window), round(plan.min_s),
                          round((item.deadline - now) / 3600, 2), jobs[item.task_id].get("accepted_start"))
            # As job_main: the trainer stops capacity.training_stop_s before the window's end (the
            # reserve for save + publish); faster-than-planned jobs finish their epochs early and free
            # the GPUs. The real save + publish is the plan's nominal × lognormal(σ 0.5).
            publish_real = plan.publish_s * math.exp(rng.gauss(0, 0.5))
            speed = math.exp(rng.gauss(0, 0.3))
            work = (plan.target_s - plan.post_s) / (1 + capacity.GPU_TIMING.margin_fraction)
            stop = min(now + work / speed, p.end - capacity.training_stop_s(plan.post_s, p.end - now))
            end = stop + publish_real
            sched.start(item.task_id, p.node_id, now, p.end, item.units)
            held = sum(h.gpus for h in sched.ledger.holds.values() if h.node_id == p.node_id)
            assert held <= 8, f"node {p.node_id} over-committed: {held} devices"
            jobs[item.task_id].update(start=now, end=end, gpus=item.units)
            heapq.heappush(events, (end, seq, "done", item.task_id))
            seq += 1
        sched.late(now)  # the control plane warms this after each dispatch pass (off the offer path)
        starts = [p.start for p in sched.place_all(list(sched.queue.values()), now) if p.node_id and p.start > now]
        if starts and min(starts) not in woken:
            woken.add(min(starts))
            heapq.heappush(events, (min(starts), seq, "wake", None))
            seq += 1

    while events:
        now, _, kind, x = heapq.heappop(events)
        if kind == "offer":
            st.offers += 1
            st.text += x.task_type in TEXT
            req = Request(x.task_id, TaskType(x.task_type), x.model, x.hours, x.params)
            t0 = time.perf_counter()
            d = adm.decide(req, now, kind=JOB)
            if time_decisions:
                st.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            if d.accepted:
                st.accepted += 1
                sched.add(Item(x.task_id, d.plan, now + x.hours * 3600, JOB, node_hint=d.placement.node_id))
                jobs[x.task_id] = {"deadline": now + x.hours * 3600, "accepted_start": round(d.placement.start - now)}
        elif kind == "done":
            sched.finish(x)
            j = jobs[x]
            st.missed += j["end"] > j["deadline"]
            st.min_slack_s = min(st.min_slack_s, j["deadline"] - j["end"])
            if DEBUG and j["end"] > j["deadline"]:
                print("late finish", x, round(j["end"] - j["deadline"]))
            st.gpu_s += max(0.0, min(j["end"], T0 + WEEK) - j["start"]) * j["gpus"]  # inside the week
        dispatch(now)
    return st


def run_reference(offers: list[Offer], nodes: int) -> Stats:
    """G.O.D's reference miner: text type, "llama" in the name, hours < 13, and not busy beyond
    the next hour; one FIFO worker that plans `hours` per job on one 8-GPU machine."""
    st, free_at = Stats(), T0
    for o in offers:
        st.offers += 1
        st.text += o.task_type in TEXT
        if o.task_type not in TEXT or "llama" not in o.model.lower() or o.hours >= 13:
            continue
        if not (free_at <= o.t or o.t + 3600 > free_at):
            continue
        st.accepted += 1
        start = max(o.t, free_at)
        free_at = start + o.hours * 3600
        fits = capacity.plan_options(o.params, o.task_type, "H100", 8)
        gpus = min(8, capacity.preferred_gpus(o.params, o.task_type))
        st.missed += (not fits) or free_at > o.t + o.hours * 3600
        st.gpu_s += max(0.0, min(free_at, T0 + WEEK) - start) * gpus if fits else 0.0
    return st


def summarise(st: Stats, nodes: int) -> dict:
    lat = sorted(st.latencies_ms)
    pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)) if lat else (lambda q: None)
    return {"offers": st.offers, "text_offers": st.text, "accepted": st.accepted,
            "accepted_share": round(st.accepted / max(st.offers, 1), 3),
            "accepted_share_text": round(st.accepted / max(st.text, 1), 3),
            "missed_deadlines": st.missed, "never_started": st.never_started, "started_under_min": st.under_min,
            "min_slack_s": round(st.min_slack_s) if st.min_slack_s != math.inf else None,
            "gpu_utilisation": round(st.gpu_s / (nodes * 8 * WEEK), 3),
            "decision_ms_p50": pct(0.5), "decision_ms_p99": pct(0.99),
            "decision_ms_max": round(lat[-1], 3) if lat else None}


def latency_at(gpus: int, load: float, seed: int) -> dict:
    """Decision latency with a realistic queue on a cluster of `gpus` devices (8 per node)."""
    nodes = gpus // 8
    st = run_brain(trace(load, seed), nodes, seed)
    out = summarise(st, nodes)
    return {"gpus": gpus, "load": load, **{k: out[k] for k in ("offers", "accepted", "missed_deadlines",
            "gpu_utilisation", "decision_ms_p50", "decision_ms_p99", "decision_ms_max")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,8,64")
    ap.add_argument("--loads", default="1,10,100")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--latency-gpus", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/scheduler_sim")
    args = ap.parse_args()
    rows = []
    for load in (float(x) for x in args.loads.split(",")):
        offers = trace(load, args.seed)
        for nodes in (int(x) for x in args.nodes.split(",")):
            t0 = time.time()
            ours = summarise(run_brain(offers, nodes, args.seed), nodes)
            ref = summarise(run_reference(offers, nodes), nodes)
            rows.append({"load": load, "nodes": nodes, "gpus": nodes * 8, "brain": ours, "reference": ref,
                         "sim_seconds": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    lat = latency_at(args.latency_gpus, 100, args.seed)
    print(json.dumps(lat), flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seed": args.seed}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "latency": lat}, indent=2))
    out.with_suffix(".md").write_text(render(meta, rows, lat))


def render(meta: dict, rows: list[dict], lat: dict) -> str:
    head = ("| load | cluster | offers | brain: accepted (all / text) | missed | closest finish | started under min | "
            "GPU util | decision p50 / p99 ms | reference: accepted (all / text) | missed | GPU util |\n|" + "---|" * 12)
    lines = ["# Scheduler simulation: one week of offers\n",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}, Python {meta['python']} "
             "(shared 2-core CPU VM; no Ray, no GPU: the same Admission/Scheduler code as the miner)",
             f"- date: {meta['date']}, seed {meta['seed']}", "", head]
    for r in rows:
        b, f = r["brain"], r["reference"]
        lines.append(f"| {r['load']:g}× ({r['load'] * MAINNET_PER_WEEK:g}/wk) | {r['nodes']}×8 H100 | {b['offers']} | "
                     f"{b['accepted_share']:.0%} / {b['accepted_share_text']:.0%} | {b['missed_deadlines']} | "
                     f"{_slack(b['min_slack_s'])} | {b['started_under_min']} | {b['gpu_utilisation']:.0%} | {b['decision_ms_p50']} / "
                     f"{b['decision_ms_p99']} | {f['accepted_share']:.0%} / {f['accepted_share_text']:.0%} | "
                     f"{f['missed_deadlines']} | {f['gpu_utilisation']:.0%} |")
    lines += ["", f"Decision latency at {lat['gpus']} GPUs ({lat['gpus'] // 8} nodes × 8), {lat['load']:g}× load, "
                  f"{lat['offers']} offers: p50 {lat['decision_ms_p50']} ms, p99 {lat['decision_ms_p99']} ms, "
                  f"max {lat['decision_ms_max']} ms (goal ≤ 5 ms); accepted {lat['accepted']}, missed "
                  f"{lat['missed_deadlines']}, GPU utilisation {lat['gpu_utilisation']:.0%}.", "", NOTES]
    return "\n".join(lines) + "\n"


def _slack(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.0f} min before"


NOTES = """Notes
- "text" = Instruct/Chat/DPO/GRPO offers; 35% of offers are ImageTask, declined by both miners, so
  "all" tops out near 65%. The brain plans all four text types (it assumes the Chat/DPO/GRPO trainers).
- missed = finished after the deadline or never started before it; closest finish = the smallest
  slack any finished job had at its deadline. Earlier runs of this table (2026-11-25 15:55) missed
  1 deadline in 2 of the 9 configs: save+upload times > ~4× nominal (the lognormal σ 0.5 tail)
  overran a reserve of 3× nominal + 3 min. The reserve is now sized as a high quantile
  (capacity.post_training_s): exp(4.26·σ) ≈ 8.4× the nominal save+publish of what the job
  publishes (full weights, or only the adapters for LoRA) + 3 min, i.e. one publish in 100,000
  overruns it; the upload speed and σ come from the knowledge base once 5 publishes are measured.
  The admission minimum (min_s) now holds this whole reserve. Cost against the earlier table:
  1×8 at 10× accepted 62% → 60% of all offers (92% → 90% of text), GPU util 92% → 91%; 1×8 at
  100× 21% → 20%, util 98% both; 8×8 at 100× 55% → 56% (re-plans shift); other rows unchanged.
  The reserve takes from training, not from the queue: 8 B full FT keeps back 28 min (was 12),
  1 B full 6 min, 70 B LoRA 7 min. Seeds 1-3 at 100× on 1/8/64 nodes: 0 misses as well. The
  reference misses jobs it queued behind a running one (it accepts when busy for < 1 h) and
  models that don't fit one 8×H100 node.
- started under min = jobs a re-plan left with less than their planned minimum training (still
  published before the deadline); admission never lets a new job shrink anyone's window.
- GPU util = GPU-hours held by jobs within the week / the cluster's GPU-hours. At 1 and 8 nodes under
  10×-100× load the brain keeps the GPUs ≥ 92% busy; larger clusters are simply not loaded enough.
- decision latency = `Admission.decide` wall time (offer → answer, in memory); p99 is the goal metric;
  the max is an outlier of a shared, busy 2-core VM (preemption), not a code path.
"""


if __name__ == "__main__":
    main()
