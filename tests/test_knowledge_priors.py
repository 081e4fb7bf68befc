"""The knowledge base feeds the LR prior: a job that published records its LR (knowledge.learn),
and the next job of the same family, size class, task type and method starts from a prior pulled
towards it (job_main.plan, before and without any search). Real SQLite store, no mocks."""
import math
import time
import uuid
from types import SimpleNamespace

import pytest
from transformers import AutoConfig

from cluster.plan import Plan
from cluster.planning.knowledge import Knowledge, Run, learn
from cluster.settings import load_settings
from cluster.state.store import Job, JobStore
from tuning.priors import param_count_from_config


def _job(demo_task, plan: Plan, task_type="InstructTextTask") -> Job:
    now = time.time()
    return Job(str(uuid.uuid4()), task_type, "org/m", "http://x/d", demo_task["dataset_type"], "s3", "r",
               1.0, now, now + 3600, plan=plan)


def test_a_recorded_win_moves_the_next_jobs_lr_prior(tmp_path, monkeypatch, tiny_models, demo_task):
    from cluster.jobs.job_main import plan

    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MINER_TRAIN_OPTIONS", raising=False)
    settings = load_settings()
    store = JobStore(settings.db_path)
    model = tiny_models["llama"]
    n = param_count_from_config(AutoConfig.from_pretrained(model))
    shape = Plan("InstructTextTask", n, "lora", "CPU", 0, 1)

    def start(job: Job):   # a fresh Knowledge each time: what it knows comes back from SQLite
        return plan(job, settings, model, demo_task["path"] / "train.json", demo_task["train"][:20], tmp_path,
                    Knowledge(store))

    first = start(_job(demo_task, shape))
    recipe = first.extra["lr_prior"]["recipe"]
    assert first.lr == recipe and first.extra["lr_prior"]["known_lrs"] == []   # nothing recorded yet

    # Neither a failure, nor another task type, nor a 10x larger model of the family moves it.
    know = Knowledge(store)
    learn(know, _job(demo_task, shape), model, SimpleNamespace(lr=recipe * 100, lora_r=8), None, "training failed")
    learn(know, _job(demo_task, Plan("DpoTask", n, "lora", "CPU", 0, 1), "DpoTask"), model,
          SimpleNamespace(lr=recipe * 100, lora_r=8), {}, None)
    know.record(Run("llama", "published", params=10 * n, task_type="InstructTextTask", method="lora", lr=recipe * 100))
    assert start(_job(demo_task, shape)).lr == recipe

    # A published job of the same family, size class, task type and method does.
    learn(know, _job(demo_task, shape), model, SimpleNamespace(lr=recipe / 10, lora_r=8),
          {"tokens": 1000, "train_seconds": 10.0}, None, (1000, 1.0))
    nxt = start(_job(demo_task, shape))
    assert nxt.extra["lr_prior"]["known_lrs"] == [pytest.approx(recipe / 10)]
    assert nxt.lr == pytest.approx(recipe / math.sqrt(10))   # one win: halfway in log space
    assert nxt.extra["lr_prior"]["recipe"] == recipe


def test_winning_lrs_keys_by_family_size_task_and_method():
    know = Knowledge()
    B = 1_000_000_000
    know.record(Run("qwen2", "published", params=1 * B, task_type="ChatTask", method="full", lr=2e-5))
    know.record(Run("qwen2", "published", params=int(1.5 * B), task_type="ChatTask", method="full", lr=4e-5))
    know.record(Run("qwen2", "published", params=1 * B, task_type="ChatTask", method="lora", lr=2e-4))
    know.record(Run("qwen2", "failed", params=1 * B, task_type="ChatTask", method="full", lr=1e-3))
    know.record(Run("llama", "published", params=1 * B, task_type="ChatTask", method="full", lr=9e-5))
    know.record(Run("qwen2", "published", params=1 * B, task_type="ChatTask", method="full", lr=None))
    assert know.winning_lrs("qwen2", int(1.2 * B), "ChatTask", "full") == [2e-5, 4e-5]
    assert know.winning_lrs("qwen2", 4 * B, "ChatTask", "full") == []
    assert know.winning_lrs(None, B, "ChatTask", "full") == []
