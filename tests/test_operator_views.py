"""What operators read, without a cluster: per-job report files, `miner jobs [--watch]`,
`miner job <task_id>` (including a failure reason), the live progress file, the metric helpers
and the Grafana dashboard. The real-cluster path is in test_cluster_local.py."""
import json
import time
import uuid

import pytest
from conftest import REPO

from cluster.console.cli import main as miner_cli
from cluster.jobs.reports import PROGRESS_FILE, PhaseTimer, write_job_report, write_timings
from cluster.protocol.wire import TaskType
from cluster.settings import load_settings, parse_labels
from cluster.state import metrics
from cluster.state.store import FAILED, PUBLISHED, RUNNING, Job, JobStore
from trainers.progress import ProgressFile, read_progress

HISTORY = [{"step": s, "epoch": 0, "loss": 3.0 - 0.1 * s, "lr": 1e-4 * min(1, s / 3), "elapsed_s": s * 0.5,
            "tokens_per_s": 1000.0 + s, **({"dev_loss": 3.1 - 0.1 * s} if s % 5 == 0 else {})} for s in range(1, 16)]


@pytest.fixture()
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path / "state"))
    settings = load_settings()
    return settings, JobStore(settings.db_path)


def _job(store, status, reason=None, **kw) -> Job:
    now = time.time()
    job = Job(task_id=str(uuid.uuid4()), task_type="InstructTextTask", model="org/model-0.5B",
              dataset_url="http://x/d.json", dataset_type={}, file_format="s3", expected_repo_name="repo",
              hours_to_complete=1.0, created_at=now - 600, deadline=now + 3000, status=status)
    store.add_job(job)
    store.update_job(job.task_id, status=status, reason=reason, **kw)
    return store.get_job(job.task_id)


def _finished_job_dir(settings, job, lr_range=True):
    d = settings.job_dir(job.task_id)
    d.mkdir(parents=True)
    (d / "hparams.json").write_text(json.dumps({"lr": 2e-4, "lora_r": 16, "epochs": 3.0, "method": "lora",
                                                "extra": {"n_params": 1234}}))
    if lr_range:
        (d / "lr_range_test.png").write_bytes(b"\x89PNG")
    timer = PhaseTimer(started_at=time.time() - 30)
    for name in ("download_dataset", "plan", "train", "publish_and_hash"):
        timer.phase(name)
    report = write_job_report(d, {"history": HISTORY, "steps": 15}, timer, selected={"step": 15, "dev_loss": 1.6})
    return d, report


def test_job_report_files_plots_hparams_timings_and_lr_range_link(state):
    settings, store = state
    job = _job(store, PUBLISHED, repo="me/repo")
    d, report = _finished_job_dir(settings, job)
    for png in ("loss_curve.png", "timings.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG" and (d / png).stat().st_size > 5000
    assert report["hyperparameters"]["lr"] == 2e-4 and report["lr_range_test"] == ["lr_range_test.png"]
    assert list(report["timings_s"]) == ["download_dataset", "plan", "train", "publish_and_hash"]
    timeline = json.loads((d / "timeline.json").read_text())
    assert [t["phase"] for t in timeline] == list(report["timings_s"])
    assert all(a["end"] == b["start"] for a, b in zip(timeline, timeline[1:]))
    assert json.loads((d / "loss_curve.json").read_text())[-1]["lr"] == HISTORY[-1]["lr"]
    assert {"loss_curve.png", "timings.png", "hparams.json", "summary.json"} <= set(report["files"])


def test_a_job_that_failed_early_still_gets_timings_and_index(state):
    settings, store = state
    d = settings.job_dir("x")
    d.mkdir(parents=True)
    timer = PhaseTimer()
    timer.phase("download_dataset")
    report = write_timings(d, timer)
    assert report["hyperparameters"] is None and report["lr_range_test"] == []
    assert (d / "timings.png").exists() and json.loads((d / "timings.json").read_text())["download_dataset"] >= 0


def test_miner_job_tells_the_story_of_a_published_and_a_failed_job(state, capsys):
    settings, store = state
    ok = _job(store, PUBLISHED, repo="me/repo", model_hash="abc123")
    _finished_job_dir(settings, ok)
    bad = _job(store, FAILED, reason="could not download the dataset: HTTP 404")
    assert miner_cli(["job", ok.task_id, "--width", "200"]) == 0
    out = capsys.readouterr().out
    for text in ("published", "me/repo", "abc123", "download dataset", "publish and hash", "deadline",
                 "chosen hyperparameters", "lora_r", "n_params", "15 *", "selected checkpoint", "lr_range_test.png"):
        assert text in out, text
    assert miner_cli(["job", bad.task_id, "--width", "200"]) == 0
    out = capsys.readouterr().out
    assert "failure reason" in out and "HTTP 404" in out
    assert miner_cli(["job", str(uuid.uuid4())]) == 2  # unknown task: a clear error, exit code 2


def test_miner_jobs_shows_live_progress_and_watch_stops_when_done(state, capsys, tmp_path):
    settings, store = state
    running = _job(store, RUNNING)
    bad = _job(store, FAILED, reason="training failed: CUDA out of memory")
    pf = ProgressFile(str(settings.job_dir(running.task_id) / PROGRESS_FILE), world_size=2, device="cuda",
                      train_deadline=time.time() + 100)
    pf.update({**HISTORY[6], "dev_loss": 2.25}, total=40)
    assert miner_cli(["jobs", "--width", "220"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if running.task_id[:8] in line)
    assert "running" in row and "7/40" in row and "2.3000" in row and "2.2500" in row and "1007" in row
    assert "CUDA out of memory" in out and bad.task_id[:8] in out

    store.update_job(running.task_id, status=PUBLISHED, repo="me/done")
    svg = tmp_path / "jobs.svg"
    started = time.time()
    assert miner_cli(["jobs", "--watch", "--until-done", "--interval", "0.1", "--width", "220",
                      "--save", str(svg)]) == 0
    assert time.time() - started < 5 and "me/done" in capsys.readouterr().out
    assert svg.read_text().startswith("<svg")


def test_progress_file_is_throttled_atomic_and_keeps_the_last_dev_loss(tmp_path):
    path = tmp_path / "p" / PROGRESS_FILE
    pf = ProgressFile(str(path), world_size=1, device="cpu", train_deadline=0, min_interval_s=60)
    pf.update(HISTORY[0], total=15)
    pf.update(HISTORY[1], total=15)                       # throttled
    assert read_progress(path)["step"] == 1
    pf.update(HISTORY[4], total=15)                       # has a dev loss: always written
    pf.update(HISTORY[5], total=15, final=True)           # the last step: always written
    p = read_progress(path)
    assert (p["step"], p["dev_loss"], p["done"]) == (6, HISTORY[4]["dev_loss"], True)
    assert not list(path.parent.glob("*.tmp*")) and read_progress(tmp_path / "missing.json") is None
    ProgressFile("", world_size=1, device="cpu", train_deadline=0).update(HISTORY[0], total=1)  # rank > 0: no-op


def test_projected_slack_and_monitor_without_ray(tmp_path):
    now = 1000.0
    assert metrics.projected_slack({"step": 10, "total": 30, "elapsed_s": 20.0}, deadline=1100.0, now=now) == 60.0
    assert metrics.projected_slack({"step": 0, "total": 30, "elapsed_s": 0.0}, deadline=1100.0, now=now) == 100.0
    pf = ProgressFile(str(tmp_path / PROGRESS_FILE), world_size=4, device="cuda", train_deadline=0)
    pf.update(HISTORY[3], total=15)
    monitor = metrics.TrainingMonitor(tmp_path / PROGRESS_FILE, "t", "InstructTextTask", deadline=time.time() + 60)
    assert monitor.poll()["step"] == 4 and monitor._counted_s == HISTORY[3]["elapsed_s"] * 4  # no Ray: no-op, no error


def test_offer_reasons_are_a_small_fixed_set_from_real_admission_messages(idle_decide):
    settings = load_settings()
    cases = {(TaskType.IMAGETASK, "org/m", 1.0): "unsupported_task_type",
             (TaskType.INSTRUCTTEXTTASK, "org/m", 0.001): "too_short",
             (TaskType.INSTRUCTTEXTTASK, "org/m", 1000.0): "too_long",
             (TaskType.INSTRUCTTEXTTASK, "not a model", 1.0): "model_unusable",
             (TaskType.INSTRUCTTEXTTASK, "org/model-70B", 1.0): "model_too_large",
             (TaskType.INSTRUCTTEXTTASK, "org/model-0.1B", 1.0): "accepted"}
    for (task_type, model, hours), reason in cases.items():
        d = idle_decide(task_type, model, hours, settings)
        assert metrics.offer_reason(d.accepted, d.message) == reason, d.message


def test_grafana_dashboard_charts_every_metric():
    dashboard = json.loads((REPO / "dashboards" / "grafana.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in metrics.METRICS:
        assert f"ray_{name}" in exprs, name


def test_train_labels_setting():
    assert parse_labels("miner-role=train, miner-node-type=gpu-8x-h100") == {
        "miner-role": "train", "miner-node-type": "gpu-8x-h100"}
    assert parse_labels("") == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_labels("miner-role")


def test_train_options_reach_every_jobs_config_and_bad_ones_stop_start_up(tmp_path, monkeypatch, tiny_models, demo_task):
    from cluster.jobs.job_main import plan

    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MINER_TRAIN_OPTIONS", '{"dev_pass": true, "lora_layer_rank": "probe", "lr": 1, '
                       '"grpo": {"compiled_decode": false}}')
    settings = load_settings()
    now = time.time()
    job = Job(str(uuid.uuid4()), "InstructTextTask", "org/m", "http://x/d", demo_task["dataset_type"], "s3", "r",
              1.0, now, now + 3600)
    cfg = plan(job, settings, tiny_models["llama"], demo_task["path"] / "train.json", demo_task["train"][:20], tmp_path)
    assert (cfg.dev_pass, cfg.lora_layer_rank, cfg.lr) == (True, "probe", 1)  # over the planner's choices
    assert cfg.grpo.compiled_decode is False and cfg.grpo.prompts_per_step is None
    assert cfg.method == "lora" and cfg.train_deadline > now  # what the options do not name stays planned
    for bad, reason in (('{"train_deadline": 0}', "not an option"), ('{"saves": "4"}', "must be int"),
                        ('{"dev_pass": 1}', "must be bool"), ("[]", "JSON object"),
                        ('{"grpo": {"compiled_decode": "no"}}', "compiled_decode must be"),
                        ('{"grpo": {"decode": false}}', "unexpected keyword"), ('{"grpo": 1}', "object of GrpoSettings")):
        monkeypatch.setenv("MINER_TRAIN_OPTIONS", bad)
        with pytest.raises(ValueError, match=reason):
            load_settings()
