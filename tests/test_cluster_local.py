"""A two-node Ray cluster on one machine, operated the way the operator's guide says:

- a head and a worker started as separate `ray start` processes on loopback; the head carries
  the `miner_control` resource of cluster.yaml's head, the worker the `miner-role=train` label;
- the miner deployed as `serve deploy` does it, from the repository's serve_config.yaml (port
  and state directory changed for the test);
- a signed offer and training request; the job's Ray Train workers must run on the worker node
  (MINER_TRAIN_LABELS), its driver on the head (asserted through the job and state APIs);
- while the job runs, both nodes' Prometheus endpoints (metrics_export_port) are scraped until
  every miner metric has appeared;
- `miner jobs` and `miner job <task_id>` tell the story afterwards.
"""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import BENCH, REPO
from substrateinterface import Keypair

from cluster.console.cli import main as miner_cli
from cluster.console.simulate import DatasetServer, ValidatorClient, register_validator
from cluster.state import metrics

pytestmark = pytest.mark.ray
GCS_PORT, DASHBOARD_PORT, SERVE_PORT = 6391, 8266, 8125
HEAD_METRICS, WORKER_METRICS = 8271, 8272
RAY_BIN = Path(sys.executable).parent


def _ray(*args, env, check=True):
    done = subprocess.run([str(RAY_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 or not check, f"ray {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _wait(predicate, timeout, what, every=0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head and worker as two `ray start` processes, the miner deployed from serve_config.yaml
    while the worker starts; `ray stop` at the end (tests run under the Ray lock)."""
    root = tmp_path_factory.mktemp("cluster")
    validator = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    hotkey = Keypair.create_from_mnemonic(Keypair.generate_mnemonic()).ss58_address
    register_validator(root / "metagraph.json", validator.ss58_address, 10_000)
    miner_env = {"MINER_STATE_DIR": str(root / "state"), "MINER_METAGRAPH_FILE": str(root / "metagraph.json"),
                 "MINER_HOTKEY": hotkey, "MIN_STAKE_THRESHOLD": "1000", "MINER_MIN_HOURS": "0.005",
                 "MINER_TRAIN_LABELS": "miner-role=train", "MINER_TRAIN_WORKERS": "1", "MINER_USE_GPU": "0"}
    dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO),  # "the miner is installed on every node"
           "RAY_metrics_report_interval_ms": "1000"}  # export every second (default 10 s): short test job
    common = ["--node-ip-address=127.0.0.1", "--object-store-memory=200000000", "--disable-usage-stats"]
    try:
        head = ["start", "--head", f"--port={GCS_PORT}", "--num-cpus=2", '--resources={"miner_control": 100}',
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                f"--metrics-export-port={HEAD_METRICS}", "--ray-client-server-port=20091",
                "--dashboard-agent-listen-port=52391", "--dashboard-agent-grpc-port=52392",
                "--runtime-env-agent-port=52393", *common]
        # Ray 2.60 gives the raylet a fixed 30 s to register with the GCS; on a loaded 2-core CI box it once
        # did not (2026-12-07): that start, and only that, is tried once more after a clean stop
        first = _ray(*head, env=env, check=False)
        if first.returncode != 0:
            assert "timed out during startup" in first.stderr, f"ray start failed:\n{first.stdout[-3000:]}\n{first.stderr[-3000:]}"
            _ray("stop", "--force", env=env, check=False)
            _mark("head start timed out; again")
            _ray(*head, env=env)
        _mark("head started")
        worker = subprocess.Popen(  # joins while the miner deploys on the head
            [str(RAY_BIN / "ray"), "start", f"--address=127.0.0.1:{GCS_PORT}", "--num-cpus=2",
             "--labels=miner-role=train", f"--metrics-export-port={WORKER_METRICS}",
             "--dashboard-agent-listen-port=52394", "--dashboard-agent-grpc-port=52395",
             "--runtime-env-agent-port=52396", *common], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        _wait(lambda: _deploy(dashboard, _serve_config(miner_env)), 30, "the dashboard's Serve API")
        _mark("serve deploy sent")
        out, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, f"worker ray start failed:\n{out[-3000:]}"
        _mark("worker started")
        yield {"root": root, "dashboard": dashboard, "miner_env": miner_env, "validator": validator, "hotkey": hotkey}
    finally:
        _ray("stop", "--force", env=env, check=False)


def _deploy(dashboard: str, config: dict) -> bool:
    """What `serve deploy serve_config.yaml -a <dashboard>` does, minus a CLI start-up: the
    schema-checked config PUT to the head's dashboard."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeDeploySchema

    body = ServeDeploySchema.model_validate(config).model_dump(exclude_unset=True)
    try:
        ServeSubmissionClient(dashboard).deploy_applications(body)
    except (RuntimeError, OSError):  # the dashboard's Serve module is still starting
        return False
    return True


def _serve_config(miner_env: dict) -> dict:
    """The repository's serve_config.yaml with the test's port and state directory."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=SERVE_PORT)
    app = config["applications"][0]
    app["args"]["reconcile_interval_s"] = 1
    app["runtime_env"]["env_vars"].update(miner_env)
    return config


_T0 = time.time()


def _mark(what: str) -> None:  # phase times, shown with pytest -s
    print(f"[cluster test] {time.time() - _T0:6.1f} s  {what}", flush=True)


@pytest.fixture(scope="module")
def model(request):
    pico = BENCH / "models" / "pico-llama"
    return pico if (pico / "config.json").exists() else request.getfixturevalue("base_model")


def _scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return ""


def test_two_node_cluster_places_training_on_the_worker_and_exports_every_metric(cluster, model, demo_task):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    root, dashboard, miner_env = cluster["root"], cluster["dashboard"], cluster["miner_env"]
    validator, hotkey = cluster["validator"], cluster["hotkey"]
    api = f"http://127.0.0.1:{SERVE_PORT}"
    _wait(lambda: _healthy(api), 60, "the miner deployed by serve deploy")
    _mark("miner API healthy")

    client = ValidatorClient(api, validator, hotkey)
    task_id = str(uuid.uuid4())
    offer = {"ds_size": 100000, "model": str(model), "hours_to_complete": 0.02, "task_id": task_id,
             "task_type": "InstructTextTask", "model_params_count": None}
    assert client.post("/task_offer/", offer, timeout=5).json()["accepted"] is True
    declined = {**offer, "task_id": str(uuid.uuid4()), "task_type": "ImageTask"}  # no image trainer
    assert client.post("/task_offer/", declined, timeout=5).json()["accepted"] is False

    jobs = JobSubmissionClient(dashboard)
    seen: dict[str, set] = {}   # metric sample name -> its lines, from scrapes while the job was active
    with DatasetServer() as data:
        request = {"model": str(model), "task_id": task_id, "hours_to_complete": 0.02,
                   "expected_repo_name": str(uuid.uuid4()), "dataset": data.publish(demo_task["path"] / "train.json"),
                   "dataset_type": demo_task["dataset_type"], "file_format": "s3"}
        assert client.post("/start_training/", request, timeout=10).status_code == 200
        _mark("training requested")

        def scrape_until_published():
            for port in (HEAD_METRICS, WORKER_METRICS):
                for line in _scrape(port).splitlines():
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    if name.startswith("ray_miner_"):
                        seen.setdefault(name, set()).add(line)
            return _published(client, task_id)

        submission = _wait(scrape_until_published, 150, "the submission", every=1.0)
    assert submission["repo"].endswith(request["expected_repo_name"])
    _mark("published")

    # Every miner metric was on a node's Prometheus endpoint while the job ran.
    missing = [n for n in metrics.exported_names() if n not in seen]
    assert not missing, f"not exported during the job: {missing}; seen: {sorted(seen)}"
    offers = "\n".join(seen["ray_miner_offers_total"])
    assert 'reason="unsupported_task_type"' in offers and 'decision="accepted"' in offers
    assert any(task_id in line and 'split="train"' in line for line in seen["ray_miner_training_loss"])
    assert any('state="running"' in line for line in seen["ray_miner_jobs"])

    # The driver ran on the head, every Ray Train worker on the labelled worker node.
    nodes = list_nodes(address=dashboard, detail=True)
    head = next(n.node_id for n in nodes if n.is_head_node)
    worker = next(n.node_id for n in nodes if (n.labels or {}).get("miner-role") == "train")
    info = _wait(lambda: (i := jobs.get_job_info(f"miner-{task_id}")).status.is_terminal() and i, 30, "the Ray Job's end")
    assert info.status.value == "SUCCEEDED" and info.driver_node_id == head
    train_workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    assert train_workers and {a.node_id for a in train_workers} == {worker}

    _mark("placement checked")
    # The operator's view of the same job.
    os.environ["MINER_STATE_DIR"] = miner_env["MINER_STATE_DIR"]
    try:
        assert miner_cli(["jobs", "--width", "200"]) == 0
        assert miner_cli(["job", task_id, "--width", "160"]) == 0
    finally:
        os.environ.pop("MINER_STATE_DIR")
    job_dir = root / "state" / "jobs" / task_id
    for name in ("loss_curve.png", "timings.png", "report.json", "timeline.json", "progress.json"):
        assert (job_dir / name).exists(), name


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _published(client, task_id):
    try:
        resp = client.get(f"/get_latest_model_submission/{task_id}")
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None
