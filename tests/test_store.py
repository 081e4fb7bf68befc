import time

from cluster.store import FAILED, PUBLISHED, QUEUED, SUBMITTED, Job, JobStore, Offer


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
    from cluster.offer_log import OfferLog

    store = JobStore(tmp_path / "m.db")
    log = OfferLog(store, flush_interval_s=3600)  # no background flush during the test
    offers = [Offer(f"t{i}", "InstructTextTask", "m", 1.0, i % 2 == 0, "ok", time.time()) for i in range(50)]
    for o in offers:
        log.record(o)
    assert log.get("t3").accepted is False and store.get_offer("t3") is None  # pending, visible
    log.close()  # closing flushes
    reopened = JobStore(tmp_path / "m.db")
    assert reopened.get_offer("t4").accepted is True and reopened.get_offer("t49") is not None
