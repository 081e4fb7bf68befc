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
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from substrateinterface import Keypair

RESULTS = Path(__file__).parent / "results"
# Offers an operator really gets: models we accept and decline, several sizes.
MODELS = ["unsloth/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B", "NousResearch/Meta-Llama-3-8B", "EleutherAI/pythia-70m"]


def signed_offers(n: int, validator: Keypair, miner_ss58: str) -> list[tuple[bytes, dict]]:
    from cluster.protocol.signing import signed_headers

    out = []
    for i in range(n):
        body = json.dumps({"ds_size": 10_000 + i, "model": MODELS[i % len(MODELS)], "hours_to_complete": 1 + i % 8,
                           "task_id": str(uuid.uuid4()), "task_type": "InstructTextTask",
                           "model_params_count": None}).encode()
        out.append((body, {"Content-Type": "application/json", **signed_headers(validator, miner_ss58, body)}))
    return out


def _http_request(host: str, port: int, body: bytes, headers: dict) -> bytes:
    lines = ["POST /task_offer/ HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _status_of_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    if length:
        await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def _send_share(host: str, port: int, raws: list[bytes], times: list[float], conns: int) -> tuple[list, dict]:
    """One process's share of the schedule, over a pool of keep-alive connections. Raw HTTP/1.1
    on asyncio streams: an httpx client costs more CPU per request than the server does, and on a
    2-core box the load generator's CPU is taken from the server under test."""
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await asyncio.open_connection(host, port))
    latencies, errors = [], {}

    async def one(raw: bytes, scheduled: float) -> None:
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        reader, writer = await pool.get()
        try:
            writer.write(raw)
            status = await _status_of_response(reader)
            pool.put_nowait((reader, writer))
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            pool.put_nowait(await asyncio.open_connection(host, port))
            return
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
            return
        latencies.append((time.monotonic() - scheduled) * 1000)

    await asyncio.gather(*(one(raw, t) for raw, t in zip(raws, times)))
    return latencies, errors


def _process_share(args: tuple) -> tuple[list, dict]:
    return asyncio.run(_send_share(*args))


def load(url: str, rate: float, requests: list[tuple[bytes, dict]], processes: int = 2, conns: int = 32) -> dict:
    """Open loop at `rate`: request i leaves at start + i/rate, whatever happened to the others;
    latency counts from that scheduled time (queueing in the client counts against us)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    raws = [_http_request(host, int(port), body, headers) for body, headers in requests]
    # spawn, not fork: the parent is a Ray driver with threads of its own
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(abs, range(processes))  # the workers are up before the clock starts
        start = time.monotonic() + 0.5  # CLOCK_MONOTONIC is system-wide: shared by the workers
        times = [start + i / rate for i in range(len(raws))]
        shares = [(host, int(port), raws[k::processes], times[k::processes], conns) for k in range(processes)]
        workers = {p.pid for p in pool._pool}  # noqa: SLF001 - the pool has no public pid list
        cpu_before = cpu_by_component(workers)
        results = pool.map(_process_share, shares)
        wall = time.monotonic() - start
        cpu_after = cpu_by_component(workers)
    cpu = {k: round((v - cpu_before.get(k, 0.0)) / max(1, len(raws)) * 1000, 3)
           for k, v in cpu_after.items() if v - cpu_before.get(k, 0.0) > 0.05}
    latencies = [x for lat, _ in results for x in lat]
    errors: dict[str, int] = {}
    for _, errs in results:
        for k, n in errs.items():
            errors[k] = errors.get(k, 0) + n
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"rate": rate, "sent": len(requests), "ok": len(latencies), "errors": errors,
            "achieved_rps": round(len(latencies) / wall, 1), "p50_ms": round(q[49], 2), "p90_ms": round(q[89], 2),
            "p99_ms": round(q[98], 2), "max_ms": round(max(latencies), 2) if latencies else None,
            "cpu_ms_per_request": cpu}


def cpu_by_component(load_pids: set[int] = frozenset()) -> dict[str, float]:
    """CPU seconds used so far by this process's descendants (Ray's daemons and actors, HAProxy,
    the load generator's `load_pids`), grouped by what they are (Linux /proc). Other users of the
    machine are left out: the numbers say where one request's CPU goes."""
    from cluster.console.embedded import proc_stat

    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            first = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            fields = proc_stat(entry.name)
        except OSError:
            continue
        pid = int(entry.name)
        # a Ray worker's title names its actor, plus the method running right now: drop that
        name = ("load generator" if pid in load_pids else first.split()[0].split(".")[0]
                if first.startswith("ray::") else Path(first.split()[0] if first else "?").name)
        procs[pid] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tick)
    ours, totals = {os.getpid()}, {}
    for _ in range(6):  # walk down the process tree a few generations
        ours |= {pid for pid, (ppid, _, _) in procs.items() if ppid in ours}
    for pid in ours - {os.getpid()}:
        if pid in procs:
            _, name, cpu = procs[pid]
            totals[name] = totals.get(name, 0.0) + cpu
    return totals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[50, 200, 500])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--port", type=int, default=8190)
    p.add_argument("--processes", type=int, default=2, help="load generator processes")
    p.add_argument("--reconcile-interval", type=float, default=10.0,
                   help="the replica's reconcile loop period (production default 10 s)")
    p.add_argument("--out", default=str(RESULTS / "offer_latency"))
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    state = Path(tempfile.mkdtemp(prefix="offer-latency-"))
    validator, miner = (Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for _ in range(2))
    os.environ.update({"MINER_STATE_DIR": str(state), "MINER_METAGRAPH_FILE": str(state / "metagraph.json"),
                       "MINER_HOTKEY": miner.ss58_address, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    from cluster.console.embedded import deploy
    from cluster.console.simulate import register_validator

    register_validator(state / "metagraph.json", validator.ss58_address, 10_000)
    ends = deploy(port=args.port, reconcile_interval_s=args.reconcile_interval)
    print(f"miner at {ends.api_url}", flush=True)
    load(ends.api_url, 20, signed_offers(40, validator, miner.ss58_address))  # warm-up
    rows = []
    for rate in args.rates:
        reqs = signed_offers(int(rate * args.seconds), validator, miner.ss58_address)
        row = load(ends.api_url, rate, reqs, args.processes)
        print(json.dumps(row), flush=True)
        rows.append(row)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    write_results(rows, args, Path(args.out), load_before)
    return 0


def write_results(rows: list[dict], args, out: Path, load_before: tuple) -> None:
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "seconds_per_rate": args.seconds,
            "load_generator_processes": args.processes, "load_average_before": load_before}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Offer latency (signed /task_offer/ on the real Ray Serve deployment, loopback)", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             f"- machine: {meta['machine']}, {meta['cpus']} CPUs, Python {meta['python']}; "
             f"load average before the run: {', '.join(f'{x:.2f}' for x in load_before)}",
             f"- open-loop load from {args.processes} processes (raw HTTP/1.1, keep-alive), latency from each "
             "request's scheduled send time; load generator on the same machine",
             "- CPU ms per request: this benchmark's processes only (/proc), Serve replica / HAProxy / load "
             "generator / the rest of Ray", "- goal: p99 <= 20 ms at 200 req/s", "",
             "| rate (req/s) | sent | ok | achieved req/s | p50 ms | p90 ms | p99 ms | max ms | errors | CPU ms/req |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = dict(r["cpu_ms_per_request"])
        parts = [cpu.pop(k, 0.0) for k in ("ray::ServeReplica:miner:MinerIngress", "haproxy", "load generator")]
        parts.append(sum(cpu.values()))
        lines.append(f"| {r['rate']:.0f} | {r['sent']} | {r['ok']} | {r['achieved_rps']} | {r['p50_ms']} | "
                     f"{r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['errors'] or '-'} | "
                     f"{' / '.join(f'{x:.2f}' for x in parts)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
