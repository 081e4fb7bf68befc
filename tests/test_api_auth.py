"""The API's auth, exactly as fiber checks it, with real sr25519 keys (no Ray needed)."""
import json
import time
import uuid

import pytest
from substrateinterface import Keypair

from cluster.protocol.signing import make_nonce, signed_headers


@pytest.fixture()
def env(api_env):
    return api_env


def _offer(model, task_type="InstructTextTask"):
    return {"ds_size": 100000, "model": model, "hours_to_complete": 1, "task_id": str(uuid.uuid4()),
            "task_type": task_type, "model_params_count": None}


def _post(env, path, payload, key=None, miner=None, body=None, **overrides):
    body = body if body is not None else json.dumps(payload).encode()
    headers = signed_headers(key or env["validator"], miner or env["miner"].ss58_address, body)
    headers.update(overrides)
    return env["client"].post(path, content=body, headers={"Content-Type": "application/json", **headers})


def test_signed_offer_is_answered_and_recorded(env):
    offer = _offer(env["model"])
    resp = _post(env, "/task_offer/", offer)
    assert resp.status_code == 200 and resp.json()["accepted"] is True
    assert env["control"].offers.get(offer["task_id"]).accepted


@pytest.mark.parametrize("dumps", [json.dumps, lambda p: json.dumps(p, separators=(",", ":"))])
def test_spaced_and_compact_bodies_both_verify(env, dumps):
    offer = _offer(env["model"])
    assert _post(env, "/task_offer/", offer, body=dumps(offer).encode()).status_code == 200


def test_unsupported_task_type_is_declined_with_reason(env):
    resp = _post(env, "/task_offer/", _offer(env["model"], "ImageTask"))
    assert resp.json() == {"message": resp.json()["message"], "accepted": False}
    assert "not supported" in resp.json()["message"]


def test_rejections_have_the_right_status(env):
    offer = _offer(env["model"])
    body = json.dumps(offer).encode()
    stranger = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    good = signed_headers(env["validator"], env["miner"].ss58_address, body)
    cases = {
        "tampered body": (401, body.replace(b'"hours_to_complete": 1', b'"hours_to_complete": 2'), good),
        "unknown hotkey": (403, body, signed_headers(stranger, env["miner"].ss58_address, body)),
        "low stake": (403, body, signed_headers(env["poor"], env["miner"].ss58_address, body)),
        "wrong miner": (401, body, signed_headers(env["validator"], stranger.ss58_address, body)),
        "stale nonce": (401, body, signed_headers(env["validator"], env["miner"].ss58_address, body,
                                                  nonce=make_nonce(time.time_ns() - 10 * 60 * 10**9))),
        "future nonce": (401, body, signed_headers(env["validator"], env["miner"].ss58_address, body,
                                                   nonce=make_nonce(time.time_ns() + 10 * 60 * 10**9))),
        "signed by another key": (401, body, {**good, "signature": signed_headers(stranger, env["miner"].ss58_address, body)["signature"]}),
        "missing headers": (401, body, {}),
    }
    for name, (status, sent, headers) in cases.items():
        resp = env["client"].post("/task_offer/", content=sent, headers={"Content-Type": "application/json", **headers})
        assert resp.status_code == status, (name, resp.text)
    assert env["control"].offers.get(offer["task_id"]) is None  # nothing stored from rejected requests


def test_replayed_nonce_is_rejected(env):
    offer = _offer(env["model"])
    body = json.dumps(offer).encode()
    headers = {"Content-Type": "application/json", **signed_headers(env["validator"], env["miner"].ss58_address, body)}
    assert env["client"].post("/task_offer/", content=body, headers=headers).status_code == 200
    assert env["client"].post("/task_offer/", content=body, headers=headers).status_code == 401


def test_signed_get_and_unknown_submission(env):
    headers = signed_headers(env["validator"], env["miner"].ss58_address, b"")
    resp = env["client"].get(f"/get_latest_model_submission/{uuid.uuid4()}", headers=headers)
    assert resp.status_code == 404
    headers = signed_headers(env["validator"], env["miner"].ss58_address, b"")
    repo = env["client"].get("/training_repo/text", headers=headers)
    assert repo.status_code == 200 and set(repo.json()) == {"github_repo", "commit_hash"}
    assert env["client"].get(f"/get_latest_model_submission/{uuid.uuid4()}").status_code == 401


def test_training_for_a_declined_offer_is_refused(env):
    offer = _offer("not a model id!")
    assert _post(env, "/task_offer/", offer).json()["accepted"] is False
    request = {"model": "not a model id!", "task_id": offer["task_id"], "hours_to_complete": 1,
               "expected_repo_name": "r", "dataset": "http://127.0.0.1:9/x.json", "file_format": "s3",
               "dataset_type": {"field_instruction": "instruct", "field_output": "output"}}
    resp = _post(env, "/start_training/", request)
    assert resp.status_code == 409 and "declined" in resp.json()["detail"]
    assert env["control"].store.get_job(offer["task_id"]) is None


def test_malformed_training_requests_get_4xx(env):
    good = {"model": env["model"], "task_id": str(uuid.uuid4()), "hours_to_complete": 1, "expected_repo_name": "r",
            "dataset": "http://127.0.0.1:9/x.json", "file_format": "s3",
            "dataset_type": {"field_instruction": "instruct", "field_output": "output"}}
    bad = [
        {**good, "task_id": "not-a-uuid"},
        {**good, "dataset_type": {"nothing": "here"}},
        {k: v for k, v in good.items() if k != "dataset"},
        {**good, "file_format": "zip"},
    ]
    for payload in bad:
        resp = _post(env, "/start_training/", payload)
        assert 400 <= resp.status_code < 500, (payload, resp.text)
    grpo = {**good, "dataset_type": {"field_prompt": "p", "reward_functions": []}}
    assert _post(env, "/start_training/", grpo).status_code == 422  # GRPO belongs on /start_training_grpo/
    assert env["control"].store.list_jobs() == []
