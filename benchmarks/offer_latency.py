"""Offer latency under load: signed `/task_offer/` requests at fixed rates against the real Ray
Serve deployment on loopback (the same app `miner serve` deploys).

Open-loop load (requests leave on a fixed schedule whether or not earlier ones are answered), so
queueing shows up in the numbers; latency is measured from each request's scheduled send time.
Requests are signed before the timed phase (a validator signs on its own machine).

    python benchmarks/offer_latency.py                       # 50, 200, 500 req/s, 10 s each
    python benchmarks/offer_latency.py --rates 200 --seconds 5
Writes benchmarks/results/offer_latency.{json,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from substrateinterface import Keypair

RESULTS = Path(__file__).parent / "results"
# Offers an operator really gets: models we accept and decline, several sizes.
MODELS = ["unsloth/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B", "NousResearch/Meta-Llama-3-8B", "EleutherAI/pythia-70m"]


def signed_offers(n: int, validator: Keypair, miner_ss58: str) -> list[tuple[bytes, dict]]:
    from cluster.signing import signed_headers

    out = []
    for i in range(n):
        body = json.dumps({"ds_size": 10_000 + i, "model": MODELS[i % len(MODELS)], "hours_to_complete": 1 + i % 8,
                           "task_id": str(uuid.uuid4()), "task_type": "InstructTextTask",
                           "model_params_count": None}).encode()
        out.append((body, {"Content-Type": "application/json", **signed_headers(validator, miner_ss58, body)}))
    return out


async def load(url: str, rate: float, requests: list[tuple[bytes, dict]]) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        start = time.perf_counter() + 0.2

        async def one(i: int, body: bytes, headers: dict) -> None:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            try:
                resp = await client.post(url + "/task_offer/", content=body, headers=headers)
                if resp.status_code != 200:
                    errors[str(resp.status_code)] = errors.get(str(resp.status_code), 0) + 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            latencies.append((time.perf_counter() - scheduled) * 1000)

        await asyncio.gather(*(one(i, b, h) for i, (b, h) in enumerate(requests)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"rate": rate, "sent": len(requests), "ok": len(latencies), "errors": errors,
            "achieved_rps": round(len(latencies) / wall, 1), "p50_ms": round(q[49], 2), "p90_ms": round(q[89], 2),
            "p99_ms": round(q[98], 2), "max_ms": round(max(latencies), 2) if latencies else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[50, 200, 500])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--port", type=int, default=8190)
    p.add_argument("--out", default=str(RESULTS / "offer_latency"))
    args = p.parse_args(argv)

    state = Path(tempfile.mkdtemp(prefix="offer-latency-"))
    validator, miner = (Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for _ in range(2))
    os.environ.update({"MINER_STATE_DIR": str(state), "MINER_METAGRAPH_FILE": str(state / "metagraph.json"),
                       "MINER_HOTKEY": miner.ss58_address, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    from cluster.embedded import deploy
    from cluster.simulate import register_validator

    register_validator(state / "metagraph.json", validator.ss58_address, 10_000)
    ends = deploy(port=args.port, reconcile_interval_s=30.0)
    print(f"miner at {ends.api_url}", flush=True)
    asyncio.run(load(ends.api_url, 20, signed_offers(40, validator, miner.ss58_address)))  # warm-up
    rows = []
    for rate in args.rates:
        reqs = signed_offers(int(rate * args.seconds), validator, miner.ss58_address)
        row = asyncio.run(load(ends.api_url, rate, reqs))
        print(json.dumps(row), flush=True)
        rows.append(row)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    write_results(rows, args, Path(args.out))
    return 0


def write_results(rows: list[dict], args, out: Path) -> None:
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "seconds_per_rate": args.seconds,
            "load_average_before": os.getloadavg()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Offer latency (signed /task_offer/ on the real Ray Serve deployment, loopback)", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             f"- machine: {meta['machine']}, {meta['cpus']} CPUs, Python {meta['python']}",
             "- open-loop load, latency from each request's scheduled send time; load generator on the same machine",
             "- goal: p99 <= 20 ms at 200 req/s", "",
             "| rate (req/s) | sent | ok | achieved req/s | p50 ms | p90 ms | p99 ms | max ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rate']:.0f} | {r['sent']} | {r['ok']} | {r['achieved_rps']} | {r['p50_ms']} | "
                     f"{r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['errors'] or '-'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
