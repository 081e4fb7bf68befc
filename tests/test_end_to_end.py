"""The whole loop on a real local Ray cluster: signed offer -> Serve -> one Ray Job per task ->
Ray Train TorchTrainer -> publish to the local hub -> signed GET of the submission, then the
same submission after the miner process is killed and restarted."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from substrateinterface import Keypair

from cluster.console.simulate import DatasetServer, ValidatorClient, register_validator
from cluster.jobs.hub import LocalHub
from cluster.jobs.model_hash import calculate_model_hash
from cluster.settings import load_settings
from cluster.state.store import FAILED, JobStore
from trainers.evaluate import evaluate_path

pytestmark = pytest.mark.ray
PORT = 8123


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    env = {"MINER_STATE_DIR": str(root / "state"), "MINER_METAGRAPH_FILE": str(root / "metagraph.json"),
           "MIN_STAKE_THRESHOLD": "1000", "MINER_HOTKEY": Keypair.create_from_mnemonic(Keypair.generate_mnemonic()).ss58_address}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    validator = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    register_validator(root / "metagraph.json", validator.ss58_address, 10_000)
    yield {"env": env, "validator": validator, "root": root}
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _wait(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _training_request(task_id, model, url, dataset_type, minutes):
    return {"model": model, "task_id": task_id, "hours_to_complete": minutes / 60,
            "expected_repo_name": str(uuid.uuid4()), "dataset": url, "dataset_type": dataset_type, "file_format": "s3"}


def test_offer_train_publish_and_signed_get(state, base_model, demo_task):
    import ray
    from ray import serve
    from ray.job_submission import JobSubmissionClient

    from cluster.console.embedded import deploy

    ends = deploy(host="127.0.0.1", port=PORT, reconcile_interval_s=2.0, num_cpus=4)
    try:
        client = ValidatorClient(ends.api_url, state["validator"], state["env"]["MINER_HOTKEY"])
        with DatasetServer() as data:
            good_id, bad_id = str(uuid.uuid4()), str(uuid.uuid4())
            offer = {"ds_size": 100000, "model": str(base_model), "hours_to_complete": 0.05, "task_id": good_id,
                     "task_type": "InstructTextTask", "model_params_count": None}
            assert client.post("/task_offer/", offer, timeout=3).json()["accepted"] is True
            good = _training_request(good_id, str(base_model), data.publish(demo_task["path"] / "train.json"),
                                     demo_task["dataset_type"], minutes=3)
            bad = _training_request(bad_id, str(base_model), data.publish(demo_task["path"] / "train.json") + "x",
                                    demo_task["dataset_type"], minutes=3)
            bad["dataset"] = bad["dataset"].replace("_train_data.json", "_missing.json")
            started = time.time()
            resp = client.post("/start_training/", good, timeout=10)
            assert resp.status_code == 200 and resp.json()["task_id"] == good_id
            assert time.time() - started < 10
            assert client.post("/start_training/", bad, timeout=10).status_code == 200

            # The job is a Ray Job named miner-<task_id>, with its metadata, while it runs.
            jobs = JobSubmissionClient(ends.dashboard_url)
            info = _wait(lambda: _job_info(jobs, f"miner-{good_id}"), 60, "the Ray Job")
            assert info.metadata["task_id"] == good_id and info.metadata["task_type"] == "InstructTextTask"
            assert info.metadata["expected_repo_name"] == good["expected_repo_name"]
            assert str(info.status.value) in ("PENDING", "RUNNING")

            sub = _wait(lambda: _submission(client, good_id), 300, "the submission")
            assert time.time() < started + 180  # published before the 3-minute deadline

        assert sub["repo"].split("/")[-1] == good["expected_repo_name"]
        snapshot = LocalHub(load_settings().hub_dir).snapshot(sub["repo"])
        assert calculate_model_hash(snapshot) == sub["model_hash"]
        adapter = json.loads((snapshot / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(base_model)

        # The submission beats the base model on held-out rows, by the validator's metric.
        base_loss = evaluate_path(base_model, str(base_model), demo_task["path"] / "test.json", demo_task["dataset_type"])
        tuned_loss = evaluate_path(snapshot, str(base_model), demo_task["path"] / "test.json", demo_task["dataset_type"])
        assert tuned_loss < base_loss

        job_dir = load_settings().job_dir(good_id)
        curve = json.loads((job_dir / "loss_curve.json").read_text())
        assert len(curve) >= 3 and curve[-1]["loss"] < curve[0]["loss"]
        assert json.loads((job_dir / "hparams.json").read_text())["lr"] > 0

        # The bad dataset failed with a readable reason and did not disturb the good job.
        store = JobStore(load_settings().db_path)
        failed = _wait(lambda: (j := store.get_job(bad_id)) and j.status == FAILED and j, 60, "the bad job to fail")
        assert "HTTP 404" in failed.reason

        # A Serve redeploy (new replica) answers from the store with the same hash.
        serve.delete("miner")
        deploy(host="127.0.0.1", port=PORT, reconcile_interval_s=2.0)
        assert _wait(lambda: _submission(client, good_id), 60, "the redeployed API") == sub
    finally:
        serve.shutdown()
        ray.shutdown()
    state["submission"] = (good_id, sub)


def test_submission_survives_killing_and_restarting_miner_serve(state):
    if "submission" not in state:
        pytest.skip("needs the end-to-end test's published job")
    task_id, sub = state["submission"]
    client = ValidatorClient(f"http://127.0.0.1:{PORT + 1}", state["validator"], state["env"]["MINER_HOTKEY"])
    for attempt in range(2):  # start, kill, start again: the answer never changes
        proc = subprocess.Popen([sys.executable, "-m", "cluster.console.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(PORT + 1)], env={**os.environ, **state["env"]},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert _wait(lambda: _submission(client, task_id), 120, f"miner serve #{attempt + 1}") == sub
        finally:
            proc.send_signal(signal.SIGKILL if attempt == 0 else signal.SIGTERM)
            proc.wait(60)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"], capture_output=True)


def _job_info(jobs, submission_id):
    try:
        return jobs.get_job_info(submission_id)
    except RuntimeError:
        return None


def _submission(client, task_id):
    try:
        resp = client.get(f"/get_latest_model_submission/{task_id}")
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None
