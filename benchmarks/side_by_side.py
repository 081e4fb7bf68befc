"""Jobs of different planned shapes on one multi-GPU host, through the miner's own admission,
placement and one Ray Job per job (issue #11), each training for real on its GPUs.

The offers declare the parameter counts that select the shapes - a 0.5 B full fine-tune on one
GPU, a 14 B LoRA on one GPU (side by side), then a 40 B LoRA + ZeRO-3 over two GPUs, queued until
both are free. The weights actually trained are small stand-ins (the job's method, worker count
and ZeRO stage follow the plan, not the weights), so each job ends in a minute or two: the
dataset is a few hundred rows served over HTTP as the validator's presigned URL, and the
models publish to the local hub. Placement groups are read from Ray's state API while the jobs
run.

  python -m benchmarks.side_by_side --task DIR --small MODEL_DIR --mid MODEL_DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

ROWS = 300


def jobs(small: Path, mid: Path) -> list[tuple[str, float, Path, float]]:
    # (name, parameters declared in the offer, weights trained, hours_to_complete)
    return [("full-1gpu", 0.5e9, small, 1.0), ("lora-1gpu", 14e9, mid, 1.0), ("lora-zero3-2gpu", 40e9, mid, 3.0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", type=Path, required=True)
    ap.add_argument("--small", type=Path, required=True)
    ap.add_argument("--mid", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit-s", type=float, default=420)
    args = ap.parse_args()
    out = args.out.resolve()
    os.environ.setdefault("MINER_USE_GPU", "1")  # MINER_USE_GPU=0: a CPU smoke run of this script
    os.environ.update(MINER_STATE_DIR=str(out / "state"), MINER_HUB_DIR=str(out / "hub"),
                      MINER_MODEL_LOOKUP="off", MINER_SEARCH_SHARE="0", MINER_PREFETCH_MODELS="0")
    from ray.util.state import list_placement_groups

    from cluster.console.embedded import ensure_ray
    from cluster.console.simulate import DatasetServer
    from cluster.control import ControlPlane
    from cluster.jobs.runner import RayJobRunner
    from cluster.protocol.wire import MinerTaskOffer, TaskType, TrainRequestText
    from cluster.settings import load_settings
    from cluster.state.store import TERMINAL

    cp = ControlPlane(load_settings(), runner=RayJobRunner(ensure_ray()))
    cp.refresh_view()
    meta = json.loads((args.task / "task.json").read_text())
    train = out / "train.json"
    train.write_text(json.dumps(json.loads((args.task / "train.json").read_text())[:ROWS]))
    report = {"cluster": cp.scheduler.view.describe(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "jobs": {}, "placement_groups": {}}
    with DatasetServer() as server:
        url = server.publish(train)  # the validator's presigned URL
        for name, declared, model, hours in jobs(args.small.resolve(), args.mid.resolve()):
            task_id = str(uuid.uuid4())
            answer = cp.offer(MinerTaskOffer(ds_size=ROWS, model=str(model), hours_to_complete=hours, task_id=task_id,
                                             task_type="InstructTextTask", model_params_count=int(declared)))
            report["jobs"][task_id] = {"name": name, "declared_params": declared, "accepted": answer.accepted,
                                       "offer_answer": answer.message}
            print(f"offer {name}: {answer.message}", flush=True)
            if answer.accepted:
                cp.start_training(TrainRequestText(model=str(model), task_id=task_id, hours_to_complete=hours,
                                                   dataset=url, dataset_type=meta["dataset_type"], file_format="s3",
                                                   expected_repo_name=f"sbs-{name}"), {TaskType.INSTRUCTTEXTTASK})
        watch(cp, report, list_placement_groups, TERMINAL, args.limit_s)
    for task_id, row in report["jobs"].items():
        job = cp.store.get_job(task_id)
        if job:
            row.update(status=job.status, reason=job.reason, repo=job.repo, started_at=job.started_at,
                       updated_at=job.updated_at, plan={k: getattr(job.plan, k) for k in
                                                        ("method", "gpus", "workers", "gpu_type", "planned_start",
                                                         "planned_end")} if job.plan else None,
                       zero_stage=(job.hparams or {}).get("zero_stage"), num_workers=(job.hparams or {}).get("num_workers"))
    (out / "side_by_side.json").write_text(json.dumps(report, indent=1, default=str))
    print("RESULTS " + json.dumps(report, default=str), flush=True)


def watch(cp, report: dict, list_placement_groups, terminal, limit_s: float) -> None:
    """Advances the queue and samples the placement groups until every job is done."""
    t0 = time.time()
    while time.time() - t0 < limit_s:
        cp.dispatch()
        cp.reconcile()
        now = round(time.time() - t0, 1)
        for pg in list_placement_groups(detail=True):
            if pg.name in report["jobs"] and pg.state == "CREATED":
                seen = report["placement_groups"].setdefault(pg.name, {
                    "bundles": [b["unit_resources"] for b in pg.bundles], "strategy": pg.strategy,
                    "nodes": sorted({b["node_id"] for b in pg.bundles}), "first_s": now})
                seen["last_s"] = now
        states = {t: cp.store.get_job(t).status for t in report["jobs"] if cp.store.get_job(t)}
        if all(s in terminal for s in states.values()):  # (none accepted: nothing to wait for)
            return
        time.sleep(1.0)


if __name__ == "__main__":
    main()
