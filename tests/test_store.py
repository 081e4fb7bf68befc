import time

from cluster.state.store import FAILED, PUBLISHED, QUEUED, SUBMITTED, Job, JobStore, Offer


def _job(task_id="t1"):
    now = time.time()
    return Job(task_id=task_id, task_type="InstructTextTask", model="m", dataset_url="http://d",
               dataset_type={"field_instruction": "instruct"}, file_format="s3", expected_repo_name="r",
               hours_to_complete=1.0, created_at=now, deadline=now + 3600)


def test_jobs_survive_reopening_the_database(tmp_path):
    store = JobStore(tmp_path / "m.db")
    assert store.add_job(_job())
    store.update_job("t1", status=PUBLISHED, repo="u/r", model_hash="ab" * 32, hparams={"lr": 1e-4})
    store.close()
    again = JobStore(tmp_path / "m.db")
    job = again.get_job("t1")
    assert (job.status, job.repo, job.model_hash, job.hparams) == (PUBLISHED, "u/r", "ab" * 32, {"lr": 1e-4})
    assert job.dataset_type == {"field_instruction": "instruct"}
    assert again._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_duplicate_job_is_not_inserted_twice(tmp_path):
    store = JobStore(tmp_path / "m.db")
    assert store.add_job(_job())
    assert not store.add_job(_job())
    assert len(store.list_jobs()) == 1


def test_conditional_update_only_applies_in_the_given_states(tmp_path):
    store = JobStore(tmp_path / "m.db")
    store.add_job(_job())
    assert store.update_job("t1", only_if_status=(QUEUED,), status=SUBMITTED)
    assert not store.update_job("t1", only_if_status=(QUEUED,), status=FAILED)
    assert store.get_job("t1").status == SUBMITTED
    assert [j.task_id for j in store.list_jobs((SUBMITTED,))] == ["t1"]


def test_offers_are_recorded(tmp_path):
    store = JobStore(tmp_path / "m.db")
    store.record_offer(Offer("t9", "DpoTask", "m", 2.0, False, "declined: no", time.time()))
    offer = store.get_offer("t9")
    assert offer.accepted is False and offer.message == "declined: no"
    assert store.get_offer("nope") is None


def test_offer_log_answers_from_memory_and_writes_in_batches(tmp_path):
    from cluster.state.offer_log import OfferLog

    store = JobStore(tmp_path / "m.db")
    log = OfferLog(store, flush_interval_s=3600)  # no background flush during the test
    offers = [Offer(f"t{i}", "InstructTextTask", "m", 1.0, i % 2 == 0, "ok", time.time()) for i in range(50)]
    for o in offers:
        log.record(o)
    assert log.get("t3").accepted is False and store.get_offer("t3") is None  # pending, visible
    log.close()  # closing flushes
    reopened = JobStore(tmp_path / "m.db")
    assert reopened.get_offer("t4").accepted is True and reopened.get_offer("t49") is not None


def test_plans_round_trip_as_json_and_old_dict_rows_still_load(tmp_path):
    import json

    from cluster.plan import Plan
    from cluster.planning.capacity import plan_options

    store = JobStore(tmp_path / "m.db")
    plan = plan_options(1_000_000_000, "InstructTextTask", "H100", 8)[0]
    job = _job()
    job.plan = plan
    store.add_job(job)
    assert store.get_job("t1").plan == plan
    placed = plan.placed("node-a", 10.0, 20.0, True)
    store.update_job("t1", plan=placed)
    assert store.get_job("t1").plan == placed and json.loads(store.query("SELECT plan FROM jobs")[0][0])["node_id"] == "node-a"
    # A row written before plans were typed: the dict, placement keys merged in, maybe a key since dropped.
    old = {**{k: v for k, v in plan.to_dict().items() if k not in ("node_id", "planned_start", "planned_end", "pinned")},
           "node_id": "node-b", "planned_start": 1.0, "planned_end": 2.0, "pinned": False, "strategy": "STRICT_PACK"}
    with store.transaction() as c:
        c.execute("UPDATE jobs SET plan = ? WHERE task_id = 't1'", (json.dumps(old),))
    loaded = store.get_job("t1").plan
    assert isinstance(loaded, Plan) and (loaded.method, loaded.gpus, loaded.node_id, loaded.planned_end) == (
        plan.method, plan.gpus, "node-b", 2.0)
    store.record_offer(Offer("o1", "InstructTextTask", "m", 1.0, True, "accepted", time.time(), plan, time.time() + 60))
    assert store.get_offer("o1").plan == plan
