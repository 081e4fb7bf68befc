"""The tournament contract: `python -m trainers.tournament ...` writes a valid model to
<output root>/<task_id>/<expected_repo_name> before its time limit."""
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from cluster.simulate import DatasetServer
from cluster.tournament import main
from trainers.evaluate import evaluate_path


def _args(task_id, model, dataset, dataset_type, task_type, out_root, hours, cache_root):
    return ["--task-id", task_id, "--model", str(model), "--dataset", str(dataset),
            "--dataset-type", json.dumps(dataset_type), "--task-type", task_type, "--file-format", "s3",
            "--expected-repo-name", "tournament-x", "--hours-to-complete", str(hours),
            "--output-root", str(out_root), "--cache-root", str(cache_root)]


@pytest.mark.parametrize("case", ["wrong task type", "missing file", "bad dataset_type"])
def test_bad_inputs_fail_fast_with_a_reason_and_write_nothing(case, tmp_path, base_model, demo_task, capsys):
    task_id, dataset, dtype, ttype = str(uuid.uuid4()), demo_task["path"] / "train.json", demo_task["dataset_type"], "InstructTextTask"
    if case == "wrong task type":
        ttype = "DpoTask"
    elif case == "missing file":
        dataset = tmp_path / "nope.json"
    else:
        dtype = {"nothing": "useful"}
    start = time.time()
    assert main(_args(task_id, base_model, dataset, dtype, ttype, tmp_path / "out", 1, tmp_path / "cache")) == 2
    assert time.time() - start < 30
    assert not (tmp_path / "out" / task_id / "tournament-x").exists()
    assert "FAILED" in capsys.readouterr().err


@pytest.mark.ray
def test_tournament_cli_writes_a_better_model_before_the_limit(tmp_path, base_model, demo_task):
    task_id, hours = str(uuid.uuid4()), 0.02  # 72 s
    out_root = tmp_path / "checkpoints"
    env = {**os.environ, "MINER_STATE_DIR": str(tmp_path / "state")}
    with DatasetServer() as server:
        url = server.publish(demo_task["path"] / "train.json")
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "trainers.tournament",
                               *_args(task_id, base_model, url, demo_task["dataset_type"], "InstructTextTask",
                                      out_root, hours, tmp_path / "cache")],
                              env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < hours * 3600, elapsed
    out = out_root / task_id / "tournament-x"
    files = {p.name for p in out.iterdir()}
    assert not any(n.startswith("checkpoint") or n == "train_state.pt" for n in files), files
    assert sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors") > 1024
    if (out / "adapter_config.json").exists():
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_model)
    test_file = demo_task["path"] / "test.json"
    assert evaluate_path(out, str(base_model), test_file, demo_task["dataset_type"]) < \
        evaluate_path(base_model, str(base_model), test_file, demo_task["dataset_type"])


def test_the_image_runs_this_module_with_the_validators_arguments():
    """The validator's exact argument list (whole hours as an int) parses; the image's entrypoint is this module."""
    from pathlib import Path

    from cluster.tournament import parse_args

    dockerfile = (Path(__file__).parents[1] / "dockerfiles" / "standalone-text-trainer.dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "trainers.tournament"]' in dockerfile
    args = parse_args(["--task-id", "t", "--model", "Qwen/Qwen2.5-0.5B", "--dataset", "https://s3/x.json",
                       "--dataset-type", '{"field_instruction": "i"}', "--task-type", "DpoTask",
                       "--file-format", "s3", "--expected-repo-name", "tournament-1-t-5abc", "--hours-to-complete", "3"])
    assert args.hours_to_complete == 3.0 and args.output_root == "/app/checkpoints" and args.cache_root == "/cache"
