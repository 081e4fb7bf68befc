"""Crashes on a real local Ray cluster (`ray start --head`, its own ports): a Train worker
killed mid-training, a trainer stuck past its guard time, and the head and the control plane
killed together while jobs are queued and running. Every accepted job ends published before its
deadline, once; what each fault cost is recorded with the job."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cluster import control as control_module
from cluster.console.simulate import DatasetServer
from cluster.control import ControlPlane
from cluster.jobs.hub import LocalHub
from cluster.jobs.model_hash import calculate_model_hash
from cluster.jobs.runner import RayJobRunner
from cluster.protocol.wire import MinerTaskOffer, TaskType, TrainRequestText
from cluster.settings import load_settings
from cluster.state.store import FAILED, PUBLISHED, SUBMITTED
from faults.helpers import make_job

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
INSTRUCT = {TaskType.INSTRUCTTEXTTASK}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """A Ray head in its own processes, so that it can be killed and started again."""

    PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
             "object-manager-port")

    def __init__(self, env):
        self.env = env
        self.ports = {name: _free_port() for name in self.PORTS}  # nothing shared with another cluster
        self.port = self.ports["port"]
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard-port']}"

    def start(self):
        subprocess.run([RAY, "start", "--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                        "--num-cpus=4", "--disable-usage-stats", *(f"--{k}={v}" for k, v in self.ports.items())],
                       env=self.env, check=True, capture_output=True, timeout=180)
        _wait(lambda: _jobs_api_up(self.dashboard), 180, "the Jobs API to accept a job")

    def crash(self, also_kill: str):
        """SIGKILL the processes matching `also_kill` (a job driver) and the GCS, then clear
        what is left of the node, as an operator restarting a crashed head would."""
        for pattern in (also_kill, f"gcs_server.*{self.port}"):
            subprocess.run(["pkill", "-9", "-f", pattern], capture_output=True)
        self.stop()

    def stop(self):
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)


def _jobs_api_up(url):
    """True once a job can be submitted (the dashboard agent has registered), not just listed."""
    try:
        RayJobRunner(url).client.submit_job(entrypoint="true", submission_id=f"ready-{uuid.uuid4().hex[:8]}")
        return True
    except Exception:
        return False


def _wait(predicate, timeout, what, tick=None):
    end = time.time() + timeout
    while time.time() < end:
        if tick:
            tick()
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    state = tmp_path_factory.mktemp("crash") / "state"
    env = {"MINER_STATE_DIR": str(state), "MINER_MODEL_LOOKUP": "off", "MINER_TRAIN_WORKERS": "1",
           "MINER_HUB_DIR": str(state / "hub")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # no metrics on this cluster: Ray 2.60's OpenTelemetry metrics thread once segfaulted Train's own
    # SynchronizationActor during a restart here (TemporalMetricStorage::buildMetrics), a second worker
    # failure that is Ray's, not the one this test makes; metrics are tested on the two-node cluster
    head = Head({**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
                 "RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0"})
    head.start()
    yield head
    head.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _control(head) -> ControlPlane:
    return ControlPlane(load_settings(), runner=RayJobRunner(head.dashboard))


def _start(control, model, url, minutes, dataset_type) -> str:
    task_id = str(uuid.uuid4())
    control.start_training(TrainRequestText(model=str(model), task_id=task_id, hours_to_complete=minutes / 60,
                                            expected_repo_name=str(uuid.uuid4()), dataset=url,
                                            dataset_type=dataset_type, file_format="s3"), INSTRUCT)
    return task_id


def _checkpoint_step(settings, task_id) -> int:
    """The step of the latest checkpoint Ray Train has registered (what a restart resumes from)."""
    for snapshot in (settings.job_dir(task_id) / "runs").glob("*/checkpoint_manager_snapshot.json"):
        try:
            return int(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"])
        except (ValueError, KeyError, TypeError):
            pass
    return 0


def _first_step_trained(settings, task_id) -> int:
    return json.loads((settings.job_dir(task_id) / "loss_curve.json").read_text())[0]["step"]


def _assert_published_once(settings, store, task_id):
    job = store.get_job(task_id)
    assert job.status == PUBLISHED, f"{task_id}: {job.status} {job.reason}"
    assert job.updated_at < job.deadline  # published before the deadline
    snapshot = LocalHub(settings.hub_dir).snapshot(job.repo)
    assert calculate_model_hash(snapshot) == job.model_hash
    return job


def test_worker_killed_mid_training_resumes_and_publishes(head, pico, demo_task, tmp_path):
    control = _control(head)
    settings, store = control.settings, control.store
    dup, rows = tmp_path / "dup.json", tmp_path / "rows.json"
    dup.write_text(json.dumps([demo_task["train"][0]] * 200))
    rows.write_text(json.dumps(demo_task["train"][:240]))  # ~20 steps: seconds on a 2-core CPU
    with DatasetServer() as data:
        good = _start(control, pico, data.publish(rows), 4, demo_task["dataset_type"])
        bad = _start(control, pico, data.publish(dup), 4, demo_task["dataset_type"])
        _wait(lambda: _checkpoint_step(settings, good) > 0, 150, "the first checkpoint", tick=control.reconcile)
        time.sleep(random.uniform(0, 1.0))  # a random later step
        from ray.util.state import list_actors

        workers = list_actors(address=head.dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                                ("state", "=", "ALIVE")])
        assert len(workers) == 1
        os.kill(workers[0]["pid"], signal.SIGKILL)
        killed_after = _checkpoint_step(settings, good)
        _wait(lambda: store.get_job(good).status in (PUBLISHED, FAILED), 150, "the publish", tick=control.reconcile)
    job = _assert_published_once(settings, store, good)
    crash = [f for f in job.faults if f["kind"] == "worker_failure"]
    assert len(crash) == 1 and "RayTrainWorker" in crash[0]["error"], job.faults
    assert crash[0]["checkpoint_step"] >= killed_after >= 1    # resumed from the last checkpoint ...
    assert crash[0]["resumed_step"] > crash[0]["checkpoint_step"] and crash[0]["time_lost_s"] > 0
    assert job.attempts == 1                                    # ... inside the same driver: not rerun
    assert _first_step_trained(settings, good) == crash[0]["checkpoint_step"] + 1
    summary = json.loads((settings.job_dir(good) / "summary.json").read_text())
    assert summary["steps"] == summary["planned_steps"]
    failed = store.get_job(bad)  # the bystander with a useless dataset failed on its own
    assert failed.status == FAILED and "only 1 distinct" in failed.reason
    print(f"\n[worker crash] killed after step {killed_after}; faults {crash}")


def test_stuck_trainer_is_overtaken_by_the_watchdog(head, pico):
    control = _control(head)
    settings, store = control.settings, control.store
    job = make_job(model=pico, minutes=0.25, status=SUBMITTED)
    store.add_job(job)
    run = settings.job_dir(job.task_id) / "runs" / f"ft-{job.task_id}"
    for step, dev in ((1, 2.5), (3, 1.5), (4, None)):  # the best, a worse one, and a cut-short one
        ckpt = run / f"checkpoint_{step:06d}"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        import shutil

        shutil.copytree(pico, ckpt)
        (ckpt / "metrics.json").write_text(json.dumps({"step": step, "dev_loss": dev}))
    with open(run / "checkpoint_000004" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    control.runner.client.submit_job(entrypoint=f"{sys.executable} -c 'import time; time.sleep(600)'",
                                     submission_id=job.submission_id)  # a trainer that never finishes
    _wait(lambda: control.runner.status(job.submission_id)[0] == "RUNNING", 60, "the stuck driver")
    _wait(lambda: store.get_job(job.task_id).status == PUBLISHED, 30, "the watchdog", tick=control.reconcile)
    published = _assert_published_once(settings, store, job.task_id)
    assert published.model_hash == calculate_model_hash(run / "checkpoint_000003")
    fault = [f for f in published.faults if f["kind"] == "watchdog_publish"][0]
    assert fault["checkpoint"] == "checkpoint_000003" and fault["slack_s"] > 0
    _wait(lambda: control.runner.status(job.submission_id)[0] == "STOPPED", 30, "the stuck driver to be stopped")
    print(f"\n[watchdog] {fault}")


def test_head_and_control_plane_crash_lose_no_job(head, pico, demo_task, tmp_path, monkeypatch):
    monkeypatch.setattr(control_module, "RESUBMIT_GRACE_S", 2.0)
    small, rows = tmp_path / "small.json", tmp_path / "rows.json"
    small.write_text(json.dumps(demo_task["train"][:60]))
    rows.write_text(json.dumps(demo_task["train"][:240]))
    dt = demo_task["dataset_type"]
    with DatasetServer() as data:
        control = _control(head)
        running = _start(control, pico, data.publish(rows), 5, dt)

        class Unreachable:  # the control plane dies between writing the job and submitting it
            def submit(self, job, settings):
                raise ConnectionError("control plane killed")
        queued = _start(ControlPlane(control.settings, control.store, runner=Unreachable()), pico,
                        data.publish(small), 5, dt)
        offered = str(uuid.uuid4())
        assert control.offer(MinerTaskOffer(model=str(pico), hours_to_complete=0.08, task_id=offered,
                                            task_type=TaskType.INSTRUCTTEXTTASK)).accepted
        # (no reconcile pass before the crash: the queued job must still be unsubmitted then)
        _wait(lambda: _checkpoint_step(control.settings, running) > 0, 120, "a checkpoint")
        lost_after = _checkpoint_step(control.settings, running)
        head.crash(also_kill=f"cluster.jobs.job_main --task-id {running}")
        del control
        crashed_at = time.time()

        head.start()  # the operator restarts the head, then `miner serve`
        control = _control(head)
        settings, store = control.settings, control.store
        assert store.get_job(queued).status == "queued"
        control.start_training(TrainRequestText(model=str(pico), task_id=offered, hours_to_complete=0.08,
                                                expected_repo_name=str(uuid.uuid4()), dataset=data.publish(small),
                                                dataset_type=dt, file_format="s3"), INSTRUCT)
        jobs = (running, queued, offered)
        _wait(lambda: all(store.get_job(t).status in (PUBLISHED, FAILED) for t in jobs), 240,
              "every job to finish", tick=control.reconcile)
    resumed = _assert_published_once(settings, store, running)
    assert resumed.attempts == 2  # one driver before the crash, one after: never two at once
    kinds = [f["kind"] for f in resumed.faults]
    assert "ray_job_lost" in kinds and "driver_restart" in kinds
    restore = [f for f in resumed.faults if f["kind"] == "run_restored"][0]
    assert restore["checkpoint_step"] >= lost_after and restore["time_lost_s"] > 0
    assert _first_step_trained(settings, running) == restore["checkpoint_step"] + 1  # resumed, not restarted
    for task_id in (queued, offered):
        assert _assert_published_once(settings, store, task_id).attempts == 1
    print(f"\n[head crash] lost after step {lost_after}; recovery {time.time() - crashed_at:.0f} s; {restore}")
