"""`python -m trainers.tournament` as the validator's container runs it, on the CPU: a network
namespace with loopback only, every capability dropped, the whole filesystem read-only except
/app/checkpoints and the temp dir, a read-only /cache laid out like the downloader's (the model
under a salted hash), the image's HOME and caches, a private /dev/shm, and a kill at the limit."""
import json

import pytest

from cluster.console.simulate import load_task
from cluster.console.tournament_sim import ContainerRun, run_container, simulate_tournament
from cluster.jobs.container import model_folders, sandbox_problem
from cluster.jobs.publish import checkpoint_is_complete
from trainers.evaluate import evaluate_path

pytestmark = [pytest.mark.ray, pytest.mark.skipif(sandbox_problem() is not None, reason=str(sandbox_problem()))]


def test_the_container_run_trains_offline_and_leaves_one_better_model(tmp_path, base_model, demo_task):
    spec = load_task(demo_task["path"], minutes=1.5)
    outcome = simulate_tournament(spec, base_model, ContainerRun(work=tmp_path, hours=spec.hours, sandbox=True))
    log = (tmp_path / "trainer.log").read_text()
    assert outcome.succeeded and outcome.exit_code == 0 and not outcome.killed, log[-3000:]
    assert outcome.detail == ""  # the simulator's own check: one model, at the top of the output folder
    assert outcome.seconds < spec.hours * 3600
    assert outcome.submission_metric < outcome.base_metric, outcome
    assert "[tournament] plan: no GPU visible" in log and "Read-only file system" not in log
    # the task folder holds the model and our work notes, nothing else; the model holds no checkpoint or resume state
    task_dir = next((tmp_path / "checkpoints").iterdir())
    assert sorted(p.name for p in task_dir.iterdir()) == sorted([".work", next(p.name for p in task_dir.iterdir()
                                                                               if p.name.startswith("tournament-sim"))])
    out = next(p for p in task_dir.iterdir() if p.name.startswith("tournament-sim"))
    assert model_folders(out) == [out] and not list(out.glob("train_state.pt"))
    assert not (task_dir / ".work" / "runs").exists()  # checkpoints removed from the validator's volume
    assert json.loads((task_dir / ".work" / "hparams.json").read_text())["run_plan"]["workers"] == 1


def test_a_kill_mid_training_still_leaves_the_last_good_model(tmp_path, base_model, demo_task, monkeypatch):
    """The limit can come while training is still going (a timeout counts as success for the
    validator; an empty folder does not). Killed right after the first export, the folder holds a
    complete, loadable model, and at every moment it was looked at it held exactly one."""
    monkeypatch.setenv("TOURNAMENT_EXPORT_POLL_S", "0.5")
    spec = load_task(demo_task["path"], minutes=60)
    watched, problems = [], []

    def out_dir():
        return next((p for p in (tmp_path / "checkpoints").glob("*/tournament-sim-*")), None)

    def tick():  # the validator's kill, early: as soon as a model is there
        out = out_dir()
        if out is None or not out.exists():
            return False
        folders = model_folders(out)
        if folders != [out]:
            problems.append(folders)
        watched.append(len(folders))
        return len(watched) >= 3

    result, out, _ = run_container(spec, base_model, str(base_model), ContainerRun(work=tmp_path, hours=1.0,
                                                                                   sandbox=True), on_tick=tick)
    assert result.killed and result.succeeded, result.log[-3000:]
    assert not problems and checkpoint_is_complete(out)
    adapter = out / "adapter_config.json"
    if adapter.exists():  # the uploader points it at the HF id; here the local base
        cfg = json.loads(adapter.read_text())
        cfg["base_model_name_or_path"] = str(base_model)
        adapter.write_text(json.dumps(cfg))
    loss = evaluate_path(out, base_model, demo_task["path"] / "test.json", demo_task["dataset_type"])
    assert loss == loss and loss < 50  # a finite validator loss: the model loads and runs
