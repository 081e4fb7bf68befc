"""A DPO task through the control plane on a real local Ray: offer -> start_training -> one Ray
Job (cluster.jobs.job_main dispatching on the task type) -> Ray Train DPO recipe -> publish to the
local hub -> the published adapter beats the base on held-out pairs by the validator's DPO loss."""
import json
import math
import time
import uuid

import pytest
from substrateinterface import Keypair

from cluster.console.simulate import DatasetServer
from cluster.jobs.hub import LocalHub
from cluster.jobs.model_hash import calculate_model_hash
from cluster.protocol.wire import MinerTaskOffer, TaskType, TrainRequestText
from cluster.settings import load_settings
from cluster.state.store import FAILED, PUBLISHED
from trainers.evaluate import evaluate_path

pytestmark = pytest.mark.ray
HOURS = 0.04  # a 144 s job: the planner caps training at the deadline minus the publishing reserve
DPO_DT = {"field_prompt": "prompt", "field_system": None, "field_chosen": "chosen", "field_rejected": "rejected",
          "prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}"}


# What every pair rejects: one preference a few steps of DPO learn for sure. The miner publishes
# trained weights only when dev shows a gain beyond noise (averaging.clearly_better); a preference
# as subtle as another row's answer is not learnt beyond noise in a loaded 2-core CI's minute.
REJECTED = "I do not know, sorry."


def _pairs(rows):
    """Preference pairs from the demo task: the right answer over a non-answer."""
    return [{"prompt": f"{r['instruct']} {r['input']}".strip(), "chosen": r["output"], "rejected": REJECTED}
            for r in rows if r["output"] != REJECTED]


def test_dpo_job_through_the_control_plane(tmp_path, monkeypatch, base_model, demo_task):
    import ray

    from cluster.console.embedded import ensure_ray
    from cluster.control import ControlPlane
    from cluster.jobs.runner import RayJobRunner

    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MINER_HOTKEY", Keypair.create_from_mnemonic(Keypair.generate_mnemonic()).ss58_address)
    train, test = tmp_path / "train.json", tmp_path / "test.json"
    train.write_text(json.dumps(_pairs(demo_task["train"])[:240]))
    test.write_text(json.dumps(_pairs(demo_task["test"])[:60]))
    settings = load_settings()
    try:
        plane = ControlPlane(settings, runner=RayJobRunner(ensure_ray(num_cpus=2)))
        task_id = str(uuid.uuid4())
        answer = plane.offer(MinerTaskOffer(model=str(base_model), hours_to_complete=HOURS, task_id=task_id,
                                            task_type=TaskType.DPOTASK))
        assert answer.accepted, answer.message
        with DatasetServer() as data:
            req = TrainRequestText(model=str(base_model), task_id=task_id, hours_to_complete=HOURS,
                                   expected_repo_name=str(uuid.uuid4()), dataset=data.publish(train),
                                   dataset_type=DPO_DT, file_format="s3")
            started = time.time()
            plane.start_training(req, {TaskType.INSTRUCTTEXTTASK, TaskType.CHATTASK, TaskType.DPOTASK})
            while time.time() < started + HOURS * 3600 + 60:
                job = plane.store.get_job(task_id)
                if job.status in (PUBLISHED, FAILED):
                    break
                time.sleep(2)
        assert job.status == PUBLISHED, job.reason
        assert job.updated_at < job.deadline  # published before the deadline
    finally:
        ray.shutdown()
    assert job.task_type == "DpoTask" and json.loads((settings.job_dir(task_id) / "hparams.json").read_text())["task_type"] == "DpoTask"
    snapshot = LocalHub(settings.hub_dir).snapshot(job.repo)
    assert calculate_model_hash(snapshot) == job.model_hash
    base = evaluate_path(base_model, base_model, test, DPO_DT, "DpoTask")
    tuned = evaluate_path(snapshot, base_model, test, DPO_DT, "DpoTask")
    assert base == pytest.approx(math.log(2), abs=1e-5)
    assert tuned < base
