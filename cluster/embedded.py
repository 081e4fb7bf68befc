"""Starting the miner on a Ray cluster: a local head when RAY_ADDRESS is not set, the Serve
app deployed by its import path (the same one `serve deploy` uses)."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from .settings import load_settings

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
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], namespace="miner")
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", namespace="miner")
    url = ray._private.worker.get_dashboard_url() or "127.0.0.1:8265"
    return url if url.startswith("http") else f"http://{url}"


def deploy(host: str = "127.0.0.1", port: int = 7999, env: dict | None = None,
           reconcile_interval_s: float = 10.0, num_cpus: int | None = None) -> Endpoints:
    from ray import serve

    dashboard = ensure_ray(num_cpus)
    serve.start(http_options={"host": host, "port": port})
    module, attr = APP_IMPORT_PATH.split(":")
    builder = getattr(importlib.import_module(module), attr)
    env = {**load_settings().as_env(), **(env or {})}
    app = builder({"env": env, "reconcile_interval_s": reconcile_interval_s})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return Endpoints(api_url=f"http://{shown}:{port}", dashboard_url=dashboard)
