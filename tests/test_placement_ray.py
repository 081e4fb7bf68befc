"""Placement on a real local Ray cluster of logical GPUs: an 8×H100 node and a 4×A100 node
(`num_gpus` plus the `accelerator_type:<T>` marker, on CPU). The control plane reads the view
from Ray, admits two jobs of different shapes, dispatches them through RayJobRunner, and each
Ray Job (pinned to its planned node) reserves its planned shape as a STRICT_PACK placement
group. The state API shows every bundle on the planned node and all 12 GPUs held."""
import json
import shlex
import sys
import time
import uuid

import pytest

from cluster.control import ControlPlane
from cluster.jobs.runner import RayJobRunner
from cluster.protocol.wire import MinerTaskOffer, TaskType, TrainRequestText
from cluster.settings import load_settings

pytestmark = pytest.mark.ray

# What Ray Train does with the plan's ScalingConfig (num_workers × resources_per_worker,
# STRICT_PACK, accelerator_type, label_selector), done directly so no GPU torch is needed.
PROBE = """
import json, time, ray
from ray.util.placement_group import placement_group
shape = json.loads({shape!r})
ray.init()
pg = placement_group(shape["bundles"], strategy="STRICT_PACK", name=shape["name"],
                     bundle_label_selector=[shape["label_selector"]] * len(shape["bundles"]))
ray.get(pg.ready(), timeout=60)
print("PLACED", flush=True)
time.sleep(120)
"""


@pytest.fixture()
def cluster(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MINER_CLUSTER", raising=False)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "object_store_memory": 80 * 2**20})
    h100 = c.add_node(num_cpus=8, num_gpus=8, resources={"accelerator_type:H100": 1}, object_store_memory=80 * 2**20)
    a100 = c.add_node(num_cpus=4, num_gpus=4, resources={"accelerator_type:A100": 1}, object_store_memory=80 * 2**20)
    ray.init(address=c.address)
    c.wait_for_nodes()
    yield {"H100": h100.node_id, "A100": a100.node_id, "dashboard": ray._private.worker.get_dashboard_url()}
    ray.shutdown()
    c.shutdown()


def _offer_and_train(cp, params, hours):
    task_id = str(uuid.uuid4())
    resp = cp.offer(MinerTaskOffer(ds_size=100000, model="org/model", hours_to_complete=hours, task_id=task_id,
                                   task_type="InstructTextTask", model_params_count=int(params)))
    assert resp.accepted, resp.message
    cp.start_training(TrainRequestText(model="org/model", task_id=task_id, hours_to_complete=hours, dataset="http://x/d",
                                       dataset_type={"field_instruction": "q", "field_output": "a"}, file_format="s3"),
                      {TaskType.INSTRUCTTEXTTASK})
    return task_id


class ProbeRunner(RayJobRunner):
    """The real runner (same submission, resources and label selector); the entrypoint is the
    probe instead of a fine-tune."""

    def submit(self, job, settings, entrypoint=None):
        from cluster.planning.capacity import placement

        plan = job.plan
        where = placement(plan)   # Ray Train's bundles: one {GPU: 1, CPU: c} per worker
        bundles = [{"CPU": plan.cpus_per_worker, "GPU": 1.0, f"accelerator_type:{plan.gpu_type}": 0.001}] * plan.workers
        shape = json.dumps({"bundles": bundles, "label_selector": where["label_selector"], "name": job.task_id})
        return super().submit(job, settings, f"{sys.executable} -c {shlex.quote(PROBE.format(shape=shape))}")


def test_two_shapes_are_placed_on_their_planned_nodes(cluster):
    from ray.util.state import list_placement_groups

    url = cluster["dashboard"]
    cp = ControlPlane(load_settings(), runner=ProbeRunner(url if url.startswith("http") else f"http://{url}"))
    cp.refresh_view()
    assert cp.scheduler.view.describe() == "1×4×A100, 1×8×H100"
    big = _offer_and_train(cp, 70e9, 6)     # LoRA + ZeRO-3 on 8 H100s
    mid = _offer_and_train(cp, 14e9, 6)     # H100s are taken: 4 A100s finish it sooner than waiting
    plans = {t: cp.store.get_job(t).plan for t in (big, mid)}
    assert (plans[big].gpu_type, plans[big].gpus, plans[big].node_id) == ("H100", 8, cluster["H100"])
    assert (plans[mid].gpu_type, plans[mid].gpus, plans[mid].node_id) == ("A100", 4, cluster["A100"])

    deadline = time.time() + 60
    while time.time() < deadline:
        pgs = {p.name: p for p in list_placement_groups(detail=True) if p.name in plans}
        if len(pgs) == 2 and all(p.state == "CREATED" for p in pgs.values()):
            break
        time.sleep(1)
    assert {n: p.state for n, p in pgs.items()} == {big: "CREATED", mid: "CREATED"}
    for task_id, pg in pgs.items():
        plan = plans[task_id]
        assert len(pg.bundles) == plan.gpus
        assert {b["node_id"] for b in pg.bundles} == {plan.node_id}
        assert all(b["unit_resources"]["GPU"] == 1 for b in pg.bundles)
        info = cp.runner.client.get_job_info(f"miner-{task_id}")
        assert info.driver_node_id == plan.node_id and info.metadata["gpus"] == str(plan.gpus)
    import ray

    assert ray.available_resources().get("GPU", 0) == 0     # 8 + 4 held, exactly the plans
    # A third job finds no device free now and is told when one frees.
    third = cp.offer(MinerTaskOffer(ds_size=100000, model="org/model", hours_to_complete=1, task_id=str(uuid.uuid4()),
                                    task_type="InstructTextTask", model_params_count=int(8e9)))
    assert not third.accepted and "busy until" in third.message
    for task_id in plans:
        cp.runner.client.stop_job(f"miner-{task_id}")
