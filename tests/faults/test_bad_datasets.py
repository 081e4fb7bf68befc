"""Hostile datasets, each ending in a readable failure: refused at start_training when that is
knowable without a download, else failed in the job before any worker starts. The download
layer runs against a real (misbehaving) HTTP server; the job layer through job_main.run_job on
a real store, next to a healthy job that must be left alone."""
import json
import time
import tracemalloc
import uuid

import pytest

from cluster.control import ControlPlane, Refused
from cluster.jobs.fetch import FetchLimits, InputError, download_dataset
from cluster.jobs.job_main import run_job
from cluster.planning.dataset_checks import MAX_ROW_CHARS, check_request, check_rows
from cluster.protocol.wire import TaskType, TrainRequestText
from cluster.state.store import FAILED, SUBMITTED
from faults.conftest import Hostile
from faults.helpers import INSTRUCT, dumps, good_rows, make_job
from trainers.instruct_format import DatasetError, tokenize_rows
from trainers.modeling import load_tokenizer

FAST = dict(connect_timeout_s=2.0, read_timeout_s=1.5, total_timeout_s=3.0, retries=2, backoff_s=0.05)
S3_EXPIRED = (b'<?xml version="1.0"?><Error><Code>AccessDenied</Code>'
              b"<Message>Request has expired</Message></Error>")

# (route, behaviour, cap in bytes, expected reason)
DOWNLOAD_FAULTS = {
    "http-404": (("status", (404, b"<Error><Code>NoSuchKey</Code></Error>")), 10**6, "HTTP 404"),
    "presigned-expired-403": (("status", (403, S3_EXPIRED)), 10**6, "presigned URL has expired"),
    "server-error-500-persistent": (("status", (500, b"oops")), 10**6, "after 3 tries: HTTP 500"),
    "no-response-read-timeout": (("hang", 10), 10**6, "stalled: no data for 1.5 s"),
    "slow-loris": (("slow_loris", 0.2), 10**6, "took longer than 3 s"),
    "truncated-body": (("truncated", b'[{"instruct": "a"'), 10**6, "after 3 tries: RemoteProtocolError"),
    "redirect-loop": (("redirect_loop", None), 10**6, "TooManyRedirects"),
    "declared-3GB": (("status", (200, b"[]")), 10**6, None),  # Content-Length set below
    "endless-undeclared-stream": (("endless", 0), 10**6, "exceeds the 1000000-byte cap; download aborted"),
    "gzip-bomb": (("gzip_bomb", 5 * 10**6), 10**6, "exceeds the 1000000-byte cap"),
    "not-json": (("status", (200, b"id,instruct,output\n1,a,b\n")), 10**6, "not JSON"),
    "html-error-page": (("status", (200, b"<html><body>Service Unavailable</body></html>")), 10**6, "not JSON"),
    "jsonl": (("status", (200, b'{"instruct": "a"}\n{"instruct": "b"}\n')), 10**6, "JSON Lines"),
    "json-object": (("status", (200, b'{"rows": []}')), 10**6, "JSON dict, expected an array"),
    "empty-array": (("status", (200, b"[]")), 10**6, "empty array"),
    "deeply-nested": (("status", (200, b"[" * 100_000 + b"]" * 100_000)), 10**6, "nested too deeply"),
    "invalid-utf8": (("status", (200, b'[{"instruct": "caf\xe9"}]')), 10**6, "not valid UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(DOWNLOAD_FAULTS))
def test_download_faults_fail_with_a_readable_reason(hostile, tmp_path, kind):
    (behaviour, cap, reason) = DOWNLOAD_FAULTS[kind]
    path = f"/{kind}-{uuid.uuid4().hex[:6]}.json"
    Hostile.routes[path] = behaviour
    if kind == "declared-3GB":
        Hostile.routes[path] = ("endless", 3 * 1024**3)
        reason = f"dataset is {3 * 1024**3} bytes, over the 1000000-byte cap"
    started = time.monotonic()
    with pytest.raises(InputError, match=reason) as err:
        download_dataset(f"{hostile}{path}?X-Amz-Signature=SECRET", tmp_path / "d.json", cap,
                         limits=FetchLimits(max_bytes=cap, **FAST))
    assert "SECRET" not in str(err.value)  # presigned credentials never reach a log or the store
    assert time.monotonic() - started < 10  # every limit in FAST is 3 s or less
    assert not (tmp_path / "d.json").exists() or kind in ("not-json", "html-error-page", "jsonl", "json-object",
                                                          "empty-array", "deeply-nested", "invalid-utf8")
    assert not (tmp_path / "d.part").exists()  # no partial download left behind


def test_transient_errors_are_retried_until_the_download_works(hostile, tmp_path):
    for status in (503, 429):
        path = f"/flaky-{status}.json"
        Hostile.routes[path] = ("flaky", (2, status, dumps(good_rows(10))))
        rows = download_dataset(f"{hostile}{path}", tmp_path / "d.json", 10**6, limits=FetchLimits(10**6, **FAST))
        assert len(rows) == 10 and Hostile.hits[path] == 3


def test_an_endless_stream_is_cut_at_the_cap_without_holding_it_in_memory(hostile, tmp_path):
    Hostile.routes["/huge.json"] = ("endless", 0)
    cap = 40 * 1024**2
    tracemalloc.start()
    with pytest.raises(InputError, match="download aborted"):
        download_dataset(f"{hostile}/huge.json", tmp_path / "d.json", cap, limits=FetchLimits(cap, **FAST))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < cap / 8, f"peak {peak} bytes while streaming a {cap}-byte cap"


# Row-level faults, checked after the download (no tokenizer, no Ray).
ROW_FAULTS = {
    "array-of-strings": (["a", "b"], "row 0 is a JSON str, expected an object"),
    "missing-output-column": ([{"instruct": "a", "input": "b"}] * 20, "no row has column 'output'"),
    "wrong-columns": ([{"prompt": "a", "completion": "b"}] * 20, "no row has column 'instruct'"),
    "non-string-values": (good_rows(20)[:5] + [{"instruct": 7, "output": "x"}], "column 'instruct' holds a int"),
    "nested-object-values": ([{"instruct": {"text": "a"}, "output": "b"}], "holds a dict, expected a string"),
    "nulls-everywhere": ([{"instruct": None, "input": None, "output": "x"}] * 30, "no usable rows: 30 of 30"),
    "empty-strings": ([{"instruct": "", "output": ""}] * 30, "no usable rows"),
    "huge-rows": ([{"instruct": "x" * (MAX_ROW_CHARS + 1), "output": "y"}] * 3, "3 are over"),
    "duplicate-rows-only": ([good_rows(1)[0]] * 500, "only 1 distinct usable row"),
}


@pytest.mark.parametrize("kind", sorted(ROW_FAULTS))
def test_row_faults_fail_with_a_readable_reason(kind):
    rows, reason = ROW_FAULTS[kind]
    with pytest.raises(InputError, match=reason):
        check_rows(rows, INSTRUCT)


def test_a_few_bad_rows_are_dropped_not_fatal():
    rows = good_rows(30) + [{"instruct": None, "output": "x"}] * 5 + [{"instruct": "x" * (MAX_ROW_CHARS + 1), "output": "y"}]
    report = check_rows(rows, INSTRUCT)
    assert (len(report.rows), report.dropped_null, report.dropped_huge, report.distinct) == (30, 5, 1, 30)


def test_rows_longer_than_the_sequence_length_in_tokens_fail_before_any_worker(pico):
    long_rows = [{"instruct": "word " * 3000, "output": "x"}] * 4
    with pytest.raises(DatasetError, match="all 4 rows exceed 1024 tokens"):
        tokenize_rows(long_rows, INSTRUCT, load_tokenizer(str(pico)), 1024)


# Knowable at start_training: refused there (HTTP 422), nothing queued.
@pytest.mark.parametrize("url,dataset_type,reason", [
    ("file:///etc/passwd", INSTRUCT, "must be http"),
    ("ftp://host/data.json", INSTRUCT, "must be http"),
    ("https://s3/x.json", {"field_input": "input", "field_output": "output"}, "no field_instruction"),
    ("https://s3/x.json", {"field_chosen": "c", "field_rejected": "r"}, "no field_prompt"),
])
def test_requests_that_cannot_work_are_refused_at_start_training(miner_env, url, dataset_type, reason):
    settings, store = miner_env
    assert reason in check_request(url, dataset_type)
    control = ControlPlane(settings, store, runner=object())
    req = TrainRequestText(model="org/model-1b", task_id=str(uuid.uuid4()), hours_to_complete=1,
                           dataset=url, dataset_type=dataset_type, file_format="s3")
    with pytest.raises(Refused, match=reason) as err:
        control.start_training(req, {TaskType.INSTRUCTTEXTTASK, TaskType.DPOTASK})
    assert err.value.status == 422 and store.list_jobs() == []


# Job level: the job fails with the reason; a healthy job in the same store is untouched.
JOB_FAULTS = {
    "http-404": (("status", (404, b"")), "HTTP 404"),
    "presigned-expired-403": (("status", (403, S3_EXPIRED)), "expired"),
    "jsonl": (("status", (200, b'{"instruct": "a"}\n{"instruct": "b"}\n')), "JSON Lines"),
    "duplicate-rows-only": (("status", (200, dumps([good_rows(1)[0]] * 100))), "only 1 distinct"),
    "wrong-columns": (("status", (200, dumps([{"q": "a", "a": "b"}] * 20))), "no row has column 'instruct'"),
}


@pytest.mark.parametrize("kind", sorted(JOB_FAULTS))
def test_bad_dataset_fails_its_job_and_leaves_others_alone(hostile, miner_env, pico, kind):
    settings, store = miner_env
    behaviour, reason = JOB_FAULTS[kind]
    path = f"/job-{kind}-{uuid.uuid4().hex[:6]}.json"
    Hostile.routes[path] = behaviour
    bystander = make_job(model=pico, url=f"{hostile}/fine.json", status=SUBMITTED)
    bad = make_job(model=pico, url=f"{hostile}{path}?X-Amz-Signature=SECRET")
    store.add_job(bystander)
    store.add_job(bad)
    before = store.get_job(bystander.task_id)
    assert run_job(bad.task_id, settings) == 1
    failed = store.get_job(bad.task_id)
    assert failed.status == FAILED and reason in failed.reason and "SECRET" not in failed.reason
    assert store.get_job(bystander.task_id) == before
    assert json.loads((settings.job_dir(bad.task_id) / "timings.json").read_text()) == {}


@pytest.mark.parametrize("task_type,dataset_type,rows,reason", [
    ("DpoTask", {"field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected"},
     [{"prompt": f"Is {i} even?", "chosen": "yes", "rejected": "yes"} for i in range(20)],
     "chosen == rejected in every one"),
    ("ChatTask", {"chat_template": "chatml", "chat_column": "conversations", "chat_role_field": "from",
                  "chat_content_field": "value", "chat_user_reference": "human", "chat_assistant_reference": "gpt"},
     [{"conversations": [{"from": "human", "value": f"hello {i}"}, {"from": "human", "value": "anyone?"}]}
      for i in range(20)],
     "no assistant turn"),
])
def test_rows_with_nothing_to_learn_fail_with_the_reason(tiny_models, task_type, dataset_type, rows, reason):
    from trainers.formats import tokenize_rows
    from trainers.instruct_format import DatasetError
    from trainers.modeling import load_tokenizer

    with pytest.raises(DatasetError, match=reason):
        tokenize_rows(task_type, rows, dataset_type, load_tokenizer(str(tiny_models["llama"])), 512)
