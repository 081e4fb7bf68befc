"""The Ray Serve deployment: the FastAPI ingress plus a reconciliation loop.

`serve deploy serve_config.yaml` imports `serve_app.app:build_app`; `miner serve` deploys the
same application. The replica owns no training: jobs are Ray Jobs, state is in SQLite.
"""
from __future__ import annotations

import asyncio
import logging

from ray import serve

from cluster.control import ControlPlane
from cluster.protocol.identity import miner_hotkey
from cluster.settings import env, load_settings
from cluster.state import metrics

from .api import api
from .auth import Authenticator
from .wiring import install

log = logging.getLogger("miner.serve")


@serve.deployment(num_replicas=1, max_ongoing_requests=200, ray_actor_options={"num_cpus": 0},
                  health_check_period_s=10, health_check_timeout_s=30,
                  # validators poll submissions; per-request access lines drown the job logs
                  logging_config={"enable_access_log": env("MINER_ACCESS_LOG") == "1"})
@serve.ingress(api)
class MinerIngress:
    def __init__(self, reconcile_interval_s: float = 10.0):
        settings = load_settings()
        self.control = ControlPlane(settings)
        install(self.control, Authenticator(settings, miner_hotkey(settings)))
        self.interval = reconcile_interval_s
        self._loop_task = asyncio.get_event_loop().create_task(self._reconcile_forever())
        log.info("miner ingress up: state %s", settings.state_dir)

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.control.reconcile)
                metrics.record_jobs_by_state(self.control.store)
            except Exception:  # never let one bad pass end the loop
                log.exception("reconcile pass failed")
            await asyncio.sleep(self.interval)

    def check_health(self) -> None:
        if self._loop_task.done():
            raise RuntimeError("reconcile loop stopped")


def build_app(args: dict | None = None):
    """Serve app builder. `args` may carry `reconcile_interval_s` and `env` (variables for the
    replica, e.g. MINER_STATE_DIR; in a serve config use the application's runtime_env)."""
    args = args or {}
    env = {k: str(v) for k, v in (args.get("env") or {}).items()}
    options = {"num_cpus": 0}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return MinerIngress.options(ray_actor_options=options).bind(
        reconcile_interval_s=float(args.get("reconcile_interval_s", 10.0)))


app = build_app()
