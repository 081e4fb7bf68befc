"""Prefetch with real SQLite and a real HTTP dataset server (no Ray): while one job holds the only
GPU, the control plane's reconcile pass downloads the inputs of the jobs queued next, once; a
bad URL only logs and leaves the other jobs alone; the job's own start then reads the prefetched
copy without the network, or fails with the readable cause."""
import json
import logging
import uuid

import pytest
from test_scheduling import RayDown, settings  # noqa: F401 - the runner without Ray, the settings fixture

from cluster.console.simulate import DatasetServer
from cluster.control import ControlPlane
from cluster.jobs.fetch import InputError, download_dataset, prefetched_path
from cluster.jobs.prefetch import DATASET_FILE, Prefetcher
from cluster.planning.ledger import parse_shape
from cluster.protocol.wire import MinerTaskOffer, TaskType, TrainRequestText
from cluster.state.store import QUEUED


def queue_job(cp, url, hours, model):
    task_id = str(uuid.uuid4())
    assert cp.offer(MinerTaskOffer(ds_size=100000, model=model, hours_to_complete=hours, task_id=task_id,
                                   task_type="InstructTextTask", model_params_count=int(1e9))).accepted
    cp.start_training(TrainRequestText(model=model, task_id=task_id, hours_to_complete=hours, dataset=url,
                                       dataset_type={"field_instruction": "q", "field_output": "a"},
                                       file_format="s3"), {TaskType.INSTRUCTTEXTTASK})
    return task_id


def test_next_jobs_inputs_download_while_the_first_trains(settings, demo_task, tmp_path, caplog):
    data = demo_task["path"] / "train.json"
    model = tmp_path / "local-model"   # a local model needs no download: only the dataset moves
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cp = ControlPlane(settings, runner=RayDown(), view=parse_shape("1x1xH100"))
    assert isinstance(cp.prefetch, Prefetcher)          # wired by default (MINER_PREFETCH_JOBS=2)
    with DatasetServer() as server:
        url = server.publish(data)
        running = queue_job(cp, url, 1.0, str(model))        # holds the only GPU
        nxt = queue_job(cp, url, 2.5, str(model))            # queued next
        bad = queue_job(cp, url.replace("_train_data", "_missing"), 4.0, str(model))  # 404
        third = queue_job(cp, url, 6.0, str(model))          # beyond the next 2: not yet
        with caplog.at_level(logging.WARNING, logger="miner.prefetch"):
            cp.reconcile()
            cp.prefetch.wait(30)
        job_dir = settings.job_dir
        ready = prefetched_path(job_dir(nxt) / DATASET_FILE)
        assert ready.read_bytes() == data.read_bytes()       # in the cache before the job starts
        assert cp.store.get_job(nxt).status == QUEUED and cp.store.get_job(nxt).started_at is None
        assert not (job_dir(running) / "prefetch").exists()  # started jobs fetch their own inputs
        assert not (job_dir(third) / "prefetch").exists()    # bounded: only the next 2
        assert not prefetched_path(job_dir(bad) / DATASET_FILE).exists()
        assert "HTTP 404" in caplog.text and bad in caplog.text and "?X-Amz" not in caplog.text
        assert cp.prefetch.jobs[nxt].result() == {"dataset": "ok", "model": "skipped"}
        first = cp.prefetch.jobs[nxt]
        cp.reconcile()                                       # idempotent: no second download
        assert cp.prefetch.jobs[nxt] is first and cp.prefetch(cp.store.get_job(nxt)) is first
        with pytest.raises(InputError, match="HTTP 404"):   # the bad job's own start fails readably
            download_dataset(cp.store.get_job(bad).dataset_url, job_dir(bad) / DATASET_FILE,
                             settings.max_dataset_bytes)
    server.httpd.server_close()

    # the server is gone: the next job's own start reads the prefetched copy, no network needed
    job = cp.store.get_job(nxt)
    rows = download_dataset(job.dataset_url, job_dir(nxt) / DATASET_FILE, settings.max_dataset_bytes)
    assert rows == demo_task["train"] and not ready.exists()
