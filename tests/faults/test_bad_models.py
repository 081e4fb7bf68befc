"""Bad base models: declined at offer time when the config tells (model source behind the same
interface as the Hub lookup), else failed fast at job start with the reason."""
import json
import shutil
import time
import uuid

import pytest

from cluster.control import ControlPlane, Refused
from cluster.jobs.job_main import run_job
from cluster.planning.model_check import (
    HubConfigSource,
    LookupUnavailable,
    ModelChecker,
    ModelGated,
    ModelMissing,
    model_dir_problem,
)
from cluster.protocol.wire import MinerTaskOffer, TaskType, TrainRequestText
from cluster.state.store import FAILED
from faults.conftest import Hostile
from faults.helpers import INSTRUCT, dumps, good_rows, make_job

LLAMA = json.loads('{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000}')


class FakeHub:
    """Answers like HubConfigSource: a config dict, or the exception the Hub lookup raises."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def config(self, model):
        self.calls += 1
        answer = self.answers[model]
        if isinstance(answer, Exception):
            raise answer
        return answer


HUB = {
    "org/llama-tiny": LLAMA,
    "org/does-not-exist": ModelMissing("model 'org/does-not-exist' does not exist on the Hub or is private"),
    "meta/gated-tiny": ModelGated("model 'meta/gated-tiny' is gated: its terms must be accepted with a token"),
    "org/custom-code-tiny": {**LLAMA, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}},
    "org/unknown-arch-tiny": {"architectures": ["FooForCausalLM"], "model_type": "foo-net"},
    "org/encoder-tiny": {"architectures": ["BertForMaskedLM"], "model_type": "bert"},
    "org/flaky-tiny": LookupUnavailable("ReadTimeout"),
}


@pytest.mark.parametrize("model,accepted,reason", [
    ("org/llama-tiny", True, "accepted"),
    ("org/does-not-exist", False, "does not exist on the Hub"),
    ("meta/gated-tiny", False, "is gated"),
    ("org/custom-code-tiny", False, "trust_remote_code"),
    ("org/unknown-arch-tiny", False, "model_type 'foo-net' is unknown"),
    ("org/encoder-tiny", False, "not a causal language model"),
    ("org/flaky-tiny", True, "accepted"),  # no answer is not a reason to decline
])
def test_offers_for_bad_models_are_declined_with_the_reason(miner_env, model, accepted, reason):
    settings, store = miner_env
    hub = FakeHub(HUB)
    control = ControlPlane(settings, store, runner=object(), models=ModelChecker(hub))
    # the size is given, as validators do, so the capacity planner has no reason to decline
    offer = MinerTaskOffer(model=model, hours_to_complete=2, task_id=str(uuid.uuid4()),
                           task_type=TaskType.INSTRUCTTEXTTASK, model_params_count=10_000_000)
    answer = control.offer(offer)
    assert answer.accepted is accepted and reason in answer.message
    assert control.offers.get(offer.task_id).accepted is accepted
    control.offer(offer)  # asked again: answered from the cache (a lookup with no answer is kept 2 minutes)
    assert hub.calls == 1


def test_a_slow_lookup_does_not_hold_up_the_offer_and_serves_start_training(miner_env):
    settings, store = miner_env

    class SlowHub(FakeHub):
        def config(self, model):
            time.sleep(0.6)
            return super().config(model)
    control = ControlPlane(settings, store, runner=object(), models=ModelChecker(SlowHub(HUB), wait_s=0.1))
    task_id = str(uuid.uuid4())
    assert not control.models.answers_now("org/custom-code-tiny")  # the API sends this offer off its loop
    started = time.monotonic()
    answer = control.offer(MinerTaskOffer(model="org/custom-code-tiny", hours_to_complete=2, task_id=task_id,
                                          task_type=TaskType.INSTRUCTTEXTTASK, model_params_count=10_000_000))
    assert answer.accepted and time.monotonic() - started < 0.5  # not known yet: not declined, not late
    time.sleep(1.0)
    assert control.models.answers_now("org/custom-code-tiny")  # cached now: answered on the loop
    req = TrainRequestText(model="org/custom-code-tiny", task_id=task_id, hours_to_complete=2,
                           dataset="https://s3/x.json", dataset_type=INSTRUCT, file_format="s3")
    with pytest.raises(Refused, match="trust_remote_code"):
        control.start_training(req, {TaskType.INSTRUCTTEXTTASK})
    assert store.list_jobs() == []


def test_hub_lookup_without_network_does_not_decline():
    # HF_HUB_OFFLINE=1 in the test env: the real Hub client cannot answer.
    with pytest.raises(LookupUnavailable):
        HubConfigSource(timeout_s=1).config("org/any-model")
    assert ModelChecker(HubConfigSource(timeout_s=1)).problem("org/any-model") is None


def _broken_copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change,reason", [
    ({"vocab_size": 4000}, "vocabulary mismatch: the tokenizer has 8192 tokens but the model's embedding has 4000"),
    ({"auto_map": {"AutoModelForCausalLM": "m.X"}}, "trust_remote_code"),
    ({"model_type": "not-a-model"}, "unknown to transformers"),
])
def test_bad_model_files_fail_the_job_fast(hostile, miner_env, pico, tmp_path, change, reason):
    settings, store = miner_env
    model = _broken_copy(pico, tmp_path / "model", **change)
    assert reason in model_dir_problem(model)
    assert ModelChecker(None).problem(str(model)) == (None if "vocab" in reason else model_dir_problem(model))
    Hostile.routes["/rows.json"] = ("status", (200, dumps(good_rows(40))))
    job = make_job(model=model, url=f"{hostile}/rows.json")
    store.add_job(job)
    assert run_job(job.task_id, settings) == 1
    failed = store.get_job(job.task_id)
    assert failed.status == FAILED and reason in failed.reason
    assert not (settings.job_dir(job.task_id) / "runs").exists()  # failed before any training
