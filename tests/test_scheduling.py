"""The durable deadline-first queue in the control plane (real SQLite, no Ray): offers reserve,
training requests queue, dispatch starts jobs in deadline order on planned nodes, and a
restarted control plane rebuilds the same promises; older databases migrate in place."""
import sqlite3
import uuid

import pytest

from cluster.control import ControlPlane
from cluster.planning.capacity import GPU_TIMING
from cluster.planning.ledger import parse_shape
from cluster.protocol.wire import MinerTaskOffer, TaskType, TrainRequestText
from cluster.settings import load_settings
from cluster.state.store import QUEUED, JobStore


class RayDown:
    """The runner when Ray is unreachable: the control plane must keep jobs queued, not lose them."""

    def submit(self, job, settings):
        raise ConnectionError("ray is down")

    def status(self, submission_id):
        return None, ""


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MINER_CLUSTER", raising=False)
    return load_settings()


def plane(settings, shape="1x1xH100", prefetch=None):
    return ControlPlane(settings, runner=RayDown(), view=parse_shape(shape), prefetch=prefetch)


def offer(cp, params=1e9, hours=2.0, task_id=None):
    o = MinerTaskOffer(ds_size=100000, model="org/Some-Model", hours_to_complete=hours,
                       task_id=task_id or str(uuid.uuid4()), task_type="InstructTextTask",
                       model_params_count=int(params))
    return o.task_id, cp.offer(o)


def train(cp, task_id, hours=2.0):
    req = TrainRequestText(model="org/Some-Model", task_id=task_id, hours_to_complete=hours, dataset="http://x/d.json",
                           dataset_type={"field_instruction": "q", "field_output": "a"}, file_format="s3")
    return cp.start_training(req, {TaskType.INSTRUCTTEXTTASK})


def test_queue_dispatches_in_deadline_order_and_survives_restart(settings):
    cp = plane(settings)
    a, ra = offer(cp, hours=1.0)
    b, rb = offer(cp, hours=1.5)
    assert ra.accepted and "starting now" in ra.message
    assert rb.accepted and "starting at" in rb.message       # queued behind a on the only GPU
    c, rc = offer(cp, hours=1.0)
    assert not rc.accepted and "busy until" in rc.message    # would make a or b late
    train(cp, b, hours=1.5)
    train(cp, a, hours=1.0)
    ja, jb = cp.store.get_job(a), cp.store.get_job(b)
    assert ja.started_at and ja.plan.node_id == "H100-0" and ja.plan.planned_end <= ja.deadline
    assert jb.started_at is None and jb.status == QUEUED      # waits for its turn, not for Ray

    fetched = []
    again = plane(settings, prefetch=lambda job: fetched.append(job.task_id))  # a restart: same promises
    assert set(again.scheduler.ledger.holds) == {a} and set(again.scheduler.queue) == {b}
    assert again.scheduler.ledger.holds[a].end == pytest.approx(ja.plan.planned_end)
    _, rc2 = offer(again, hours=1.0)
    assert not rc2.accepted and "busy until" in rc2.message
    again.reconcile()
    assert fetched == [b]                                     # the next job's inputs prefetch meanwhile

    cp.store.update_job(a, status="published")               # a finishes: b starts on reconcile
    again.reconcile()
    jb = again.store.get_job(b)
    assert jb.started_at and jb.plan.node_id == "H100-0" and a not in again.scheduler.ledger.holds


def test_reservation_of_an_accepted_offer_survives_restart_and_expires(settings, monkeypatch):
    monkeypatch.setenv("MINER_RESERVATION_TTL_S", "1")
    settings = load_settings()
    cp = plane(settings)
    a, ra = offer(cp, params=3e9, hours=2.0)
    assert ra.accepted
    cp.offers.flush()   # offer records are written behind (OfferLog); a crash may lose the last 50 ms
    assert a in plane(settings).scheduler.queue                # restored from the offers table
    import time
    time.sleep(1.1)
    cp.reconcile()
    assert a not in cp.scheduler.queue
    assert offer(cp, params=3e9, hours=2.0)[1].accepted


def test_training_request_without_offer_is_admitted_or_refused_with_reason(settings):
    from cluster.control import Refused

    cp = plane(settings)
    a, _ = offer(cp, hours=1.0)
    train(cp, a, hours=1.0)
    with pytest.raises(Refused) as err:
        train(cp, str(uuid.uuid4()), hours=1.0)
    assert err.value.status == 422 and "busy until" in err.value.reason


def test_older_database_migrates_in_place(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE jobs (task_id TEXT PRIMARY KEY, task_type TEXT NOT NULL, model TEXT NOT NULL,
            dataset_url TEXT NOT NULL, dataset_type TEXT NOT NULL, file_format TEXT NOT NULL,
            expected_repo_name TEXT NOT NULL, hours_to_complete REAL NOT NULL, created_at REAL NOT NULL,
            deadline REAL NOT NULL, status TEXT NOT NULL, reason TEXT, ray_submission_id TEXT, repo TEXT,
            model_hash TEXT, hparams TEXT, updated_at REAL NOT NULL);
        CREATE TABLE offers (task_id TEXT PRIMARY KEY, task_type TEXT NOT NULL, model TEXT NOT NULL,
            hours_to_complete REAL NOT NULL, accepted INTEGER NOT NULL, message TEXT NOT NULL, created_at REAL NOT NULL);
        INSERT INTO jobs VALUES ('t1', 'InstructTextTask', 'org/m-1B', 'u', '{}', 's3', 'r', 2, 1, 7201, 'published',
            NULL, NULL, 'me/r', 'h', NULL, 1);
        INSERT INTO offers VALUES ('t1', 'InstructTextTask', 'org/m-1B', 2, 1, 'ok', 1);
    """)
    con.commit()
    con.close()
    store = JobStore(db)
    job = store.get_job("t1")
    assert job.repo == "me/r" and job.plan is None and job.started_at is None
    assert store.get_offer("t1").plan is None and store.reserved_offers(0) == []


def test_finished_jobs_teach_the_knowledge_base_by_family(settings, tmp_path):
    import json

    from cluster.planning.knowledge import learn

    base_model = tmp_path / "model"
    base_model.mkdir()
    (base_model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    cp = plane(settings)
    a, _ = offer(cp, hours=1.0)
    train(cp, a, hours=1.0)
    job = cp.store.get_job(a)
    predicted = job.plan.tokens_per_s
    learn(cp.knowledge, job, base_model, None, {"tokens": predicted * 50, "train_seconds": 100.0}, None)
    again = plane(settings)                           # read back from SQLite after a restart
    assert again.knowledge.speedup("llama") == 0.5    # keyed by config.json's model_type
    for _ in range(2):
        learn(again.knowledge, job, base_model, None, None, "training failed: NaN loss")
    assert "'llama' failed 2 times" in again.knowledge.blocked("llama")
    assert plane(settings).knowledge.blocked("llama")


def test_a_short_cpu_job_that_was_admitted_is_dispatched(settings):
    cp = plane(settings, shape="1x3xCPU")          # CPU mode, a 72-second budget (tests, demo)
    task_id, resp = offer(cp, params=5e6, hours=0.02)
    assert resp.accepted, resp.message
    train(cp, task_id, hours=0.02)
    assert cp.store.get_job(task_id).started_at is not None


def test_publish_measurements_persist_and_older_knowledge_tables_migrate(settings, tmp_path):
    import json

    from cluster.planning.knowledge import learn

    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    old = sqlite3.connect(settings.db_path)
    old.executescript("""CREATE TABLE knowledge (id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT,
        family TEXT NOT NULL, model TEXT, params INTEGER, task_type TEXT, method TEXT, gpus INTEGER,
        gpu_type TEXT, lr REAL, lora_r INTEGER, tokens_per_s REAL, predicted_tokens_per_s REAL,
        peak_mem_gib REAL, outcome TEXT NOT NULL, reason TEXT, recorded_at REAL NOT NULL);
        INSERT INTO knowledge (family, outcome, recorded_at) VALUES ('llama', 'published', 1);""")
    old.commit()
    old.close()
    base_model = tmp_path / "model"
    base_model.mkdir()
    (base_model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cp = plane(settings)                     # the old table gains the upload columns
    a, _ = offer(cp, hours=1.0)
    train(cp, a, hours=1.0)
    job = cp.store.get_job(a)
    for seconds in (10.0, 20.0, 40.0, 20.0, 20.0):
        learn(cp.knowledge, job, base_model, None, {}, None, upload=(int(1e9), seconds))
    timing = plane(settings).knowledge.publish_timing(GPU_TIMING)
    assert timing.upload_bps == 5e7           # the median of 1 GB in 10/20/40 s, read back after a restart
    assert 0.3 < timing.publish_sigma < 0.6
