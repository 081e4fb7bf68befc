"""Hub and disk faults: uploads retried with backoff within the deadline (a hub that fails like
the real client), partial uploads never reported, a full disk during a checkpoint save leaves
the last good checkpoint intact, caches pruned by size, least recently used first."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.utils import hf_raise_for_status

from cluster.jobs.hub import LocalHub, PartialUpload, RetryPolicy
from cluster.jobs.model_hash import calculate_model_hash
from cluster.jobs.publish import best_checkpoint, checkpoint_is_complete, publish
from cluster.state import cache
from cluster.state.store import FAILED, PUBLISHED, RUNNING
from faults.helpers import make_job

FAST = RetryPolicy(attempts=6, base_s=0.05, max_s=0.5)
REPO = Path(__file__).resolve().parents[2]


def hub_error(status: int) -> Exception:
    """The exception the real Hub client raises for this HTTP status."""
    try:
        hf_raise_for_status(httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/x")))
    except Exception as exc:
        return exc
    raise AssertionError("no error raised")


class FlakyHub(LocalHub):
    """A LocalHub whose uploads follow a script: an exception to raise, "partial" (copy half the
    files and report success, like an interrupted transfer), or None (work)."""

    def __init__(self, root, script):
        super().__init__(root)
        self.script, self.calls = list(script), 0

    def upload_folder(self, folder, repo_id):
        self.calls += 1
        step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            raise step
        if step == "partial":
            dest = self._repo_dir(repo_id)
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            for f in sorted(Path(folder).iterdir())[::2]:
                shutil.copy(f, dest / f.name)
            return
        super().upload_folder(folder, repo_id)


@pytest.fixture
def model_out(pico, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(pico, out)
    return out


def test_upload_is_retried_with_backoff_through_5xx_429_and_timeouts(miner_env, model_out, tmp_path):
    settings, _ = miner_env
    hub = FlakyHub(tmp_path / "hub", [hub_error(503), hub_error(429), httpx2.ReadTimeout("write timed out"),
                                      hub_error(502)])
    started = time.time()
    repo, model_hash = publish(model_out, make_job(), settings, hub=hub, policy=FAST)
    assert hub.calls == 5
    assert time.time() - started >= 0.05 * 0.5 * (1 + 2 + 4 + 8)  # it backed off between tries
    assert model_hash == calculate_model_hash(model_out) == calculate_model_hash(hub.snapshot(repo))


def test_a_client_error_is_not_retried(miner_env, model_out, tmp_path):
    settings, _ = miner_env
    hub = FlakyHub(tmp_path / "hub", [hub_error(401)])
    with pytest.raises(Exception, match="401"):
        publish(model_out, make_job(), settings, hub=hub, policy=FAST)
    assert hub.calls == 1


def test_retries_stop_before_the_deadline(miner_env, model_out, tmp_path):
    settings, _ = miner_env
    hub = FlakyHub(tmp_path / "hub", [hub_error(503)] * 10)
    job = make_job(minutes=0.1)  # 6 s left: retries must leave the last 5 s alone
    started = time.time()
    with pytest.raises(Exception, match="503"):
        publish(model_out, job, settings, hub=hub, policy=RetryPolicy(attempts=10, base_s=1.0))
    assert time.time() < job.deadline - 4 and time.time() - started < 2.5


def test_a_partial_upload_is_uploaded_again_and_never_reported(miner_env, model_out, tmp_path):
    settings, _ = miner_env
    hub = FlakyHub(tmp_path / "hub", ["partial"])
    repo, model_hash = publish(model_out, make_job(), settings, hub=hub, policy=FAST)
    assert hub.calls == 2 and model_hash == calculate_model_hash(hub.snapshot(repo))
    always_partial = FlakyHub(tmp_path / "hub2", ["partial"] * 10)
    with pytest.raises(PartialUpload):
        publish(model_out, make_job(), settings, hub=always_partial, policy=RetryPolicy(attempts=3, base_s=0.01))


def test_publish_failure_leaves_the_job_failed_not_published(hostile, miner_env, pico, tmp_path, monkeypatch):
    """The watchdog path end to end: every upload fails; the job ends FAILED with the reason."""
    from cluster.jobs.watchdog import Watchdog

    settings, store = miner_env
    job = make_job(model=pico, status=RUNNING)
    store.add_job(job)
    ckpt = settings.job_dir(job.task_id) / "runs" / f"ft-{job.task_id}" / "checkpoint_000001"
    shutil.copytree(pico, ckpt)
    dog = Watchdog(settings, store, runner_fn=lambda: None, hub=FlakyHub(tmp_path / "hub", [hub_error(401)]))
    assert dog.take_over(job, "test", stop_driver=False)
    dog.wait(30)
    failed = store.get_job(job.task_id)
    assert failed.status == FAILED and "401" in failed.reason and failed.repo is None


DISK_FULL = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a full disk: writes fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from transformers import AutoModelForCausalLM, AutoTokenizer
from trainers.modeling import save_trainable
from trainers.launch import export_checkpoint
model_dir, new_ckpt, good_ckpt, out = map(Path, sys.argv[1:5])
errors = []
try:
    save_trainable(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), str(new_ckpt))
except Exception as exc:
    errors.append(f"save: {exc}")
try:
    export_checkpoint(good_ckpt, out)
except Exception as exc:
    errors.append(f"export: {exc}")
print("|".join(errors))
"""


def test_disk_full_during_save_leaves_the_last_good_checkpoint(pico, tmp_path):
    run = tmp_path / "runs" / "ft-x"
    good = run / "checkpoint_000001"
    shutil.copytree(pico, good)
    (good / "metrics.json").write_text(json.dumps({"step": 10, "dev_loss": 2.0}))
    before = calculate_model_hash(good)
    new = run / "checkpoint_000002"
    res = subprocess.run([sys.executable, "-c", DISK_FULL, str(pico), str(new), str(good), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "save: " in res.stdout and "File too large" in res.stdout, res.stderr[-2000:]
    assert "export: " in res.stdout
    assert new.exists() and not checkpoint_is_complete(new)  # the cut-short save is there ...
    assert best_checkpoint(tmp_path / "runs") == good          # ... and never chosen
    assert calculate_model_hash(good) == before
    assert not (tmp_path / "out").exists()  # the export was staged: no partial model folder


def test_cache_keeps_within_its_cap_least_recently_used_first(miner_env, monkeypatch):
    settings, store = miner_env

    def unit(path: Path, age_s: float, nbytes=4000):
        path.mkdir(parents=True)
        (path / "blob.bin").write_bytes(b"x" * nbytes)
        (path.parent / "summary.json").write_text("{}") if path.name == "runs" else None
        t = time.time() - age_s
        os.utime(path, (t, t))
        if path.name == "runs":
            os.utime(path.parent, (t, t))

    done, active = make_job(status=PUBLISHED), make_job(model="org/in-use")
    store.add_job(done)
    store.add_job(active)
    unit(settings.job_dir(done.task_id) / "runs", 400)
    unit(settings.job_dir(active.task_id) / "runs", 500)                     # oldest, but active
    unit(cache.hf_cache_entry(settings.model_cache_dir, "org/old"), 300)
    unit(cache.hf_cache_entry(settings.model_cache_dir, "org/recent"), 100)
    unit(cache.hf_cache_entry(settings.model_cache_dir, "org/in-use"), 450)  # used by the active job
    cache.touch(cache.hf_cache_entry(settings.model_cache_dir, "org/recent"))
    removed = cache.prune(cache.units(settings), max_bytes=12000, keep=cache.protected(settings, store))
    assert removed == [settings.job_dir(done.task_id), cache.hf_cache_entry(settings.model_cache_dir, "org/old")]
    assert (settings.job_dir(done.task_id) / "summary.json").exists()  # reports stay, bulk goes
    assert not (settings.job_dir(done.task_id) / "runs").exists()
    assert (settings.job_dir(active.task_id) / "runs").exists()
    assert cache.hf_cache_entry(settings.model_cache_dir, "org/in-use").exists()
    assert cache.hf_cache_entry(settings.model_cache_dir, "org/recent").exists()
    assert sum(u.size for u in cache.units(settings)) <= 12000
