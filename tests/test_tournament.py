"""The tournament contract without a container: the validator's arguments and environment, bad
inputs, the plan for every GPU the validator gives, and the output folder's one-model rule.
(tests/test_tournament_container.py runs the entrypoint as the validator's container does.)"""
import json
import os
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path

import pytest

from cluster.jobs.container import model_folders, upload_candidate
from cluster.jobs.publish import checkpoint_is_complete
from cluster.jobs.tournament import main, parse_args, prepare
from cluster.jobs.tournament_plan import Hardware, ray_init_kwargs, validator_gpus
from cluster.settings import TournamentEnv, load_settings, load_tournament_env
from trainers.config import TrainConfig
from trainers.launch import export_checkpoint

REPO = Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"
# Shapes of real models (config.json fields only: no weights anywhere)
CONFIGS = {
    "0.5B": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=32768),
    "8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "32B": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, intermediate_size=27648,
                num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768),
    "70B": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}


def _args(task_id, model, dataset, dataset_type, task_type, hours="1.0"):
    return ["--task-id", task_id, "--model", str(model), "--dataset", str(dataset),
            "--dataset-type", dataset_type if isinstance(dataset_type, str) else json.dumps(dataset_type),
            "--task-type", task_type, "--file-format", "s3", "--expected-repo-name", "tournament-x",
            "--hours-to-complete", hours]


@pytest.fixture()
def roots(tmp_path, monkeypatch):
    """The validator's volumes under tmp_path (TOURNAMENT_OUTPUT_ROOT / TOURNAMENT_CACHE_ROOT)."""
    out, cache = tmp_path / "checkpoints", tmp_path / "cache"
    (cache / "datasets").mkdir(parents=True)
    (cache / "models").mkdir()
    monkeypatch.setenv("TOURNAMENT_OUTPUT_ROOT", str(out))
    monkeypatch.setenv("TOURNAMENT_CACHE_ROOT", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return out, cache


CASES = ["malformed dataset-type JSON", "dataset-type of another task", "unknown task type", "missing /cache model",
         "no usable rows", "zero hours", "negative hours", "no dataset"]


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_exit_non_zero_with_one_line_and_write_nothing(case, roots, base_model, demo_task, capsys):
    out, cache = roots
    task_id, model, dtype, ttype, hours = str(uuid.uuid4()), str(base_model), demo_task["dataset_type"], "InstructTextTask", "1.0"
    rows = demo_task["train"]
    if case == "malformed dataset-type JSON":
        dtype = '{"field_instruction": "instruct",'
    elif case == "dataset-type of another task":
        ttype = "DpoTask"
    elif case == "unknown task type":
        ttype = "ImageTask"
    elif case == "missing /cache model":
        model = "org/not-downloaded"
    elif case == "no usable rows":
        rows = [{"instruct": "", "input": "", "output": None} for _ in range(50)]
    elif case == "zero hours":
        hours = "0"
    elif case == "negative hours":
        hours = "-1.5"
    if case != "no dataset":
        (cache / "datasets" / f"{task_id}_train_data.json").write_text(json.dumps(rows))
    assert main(_args(task_id, model, "https://s3.example/x.json", dtype, ttype, hours)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("[tournament] FAILED: "), err
    assert not (out / task_id / "tournament-x").exists()


def test_the_validators_arguments_and_environment_are_read(monkeypatch, tmp_path):
    stats = tmp_path / "baseline_stats.json"
    stats.write_text(json.dumps({"loss": 1.25}))
    monkeypatch.setenv("USE_KL", "1")
    monkeypatch.setenv("KL_COEF", "0.7")
    monkeypatch.setenv("BASELINE_STATS_PATH", str(stats))
    monkeypatch.setenv("MINER_DATASETS_DIR", "/cache/miner_datasets")
    monkeypatch.setenv("MINER_DATASETS", "org--a,org--b")
    monkeypatch.setenv("WANDB_MODE", "offline")
    env = load_tournament_env()
    assert env.use_kl and env.kl_weight == 0.7 and env.baseline_stats == {"loss": 1.25}
    assert [p.name for p in env.miner_datasets] == ["org--a", "org--b"] and env.wandb["WANDB_MODE"] == "offline"
    # G.O.D passes str(float) hours and a salted 16-hex model folder name; defaults are the container's paths
    args = parse_args(_args("t", "3f9a0c1b2d4e5f60", "https://s3.example/x.json", {"field_prompt": "p"}, "DpoTask",
                            "2.3333333333333335"), TournamentEnv())
    assert args.hours_to_complete == pytest.approx(2.3333333) and args.output_root == "/app/checkpoints"
    assert args.cache_root == "/cache"


@pytest.mark.parametrize("name,value,reason", [("USE_KL", "yes", "USE_KL"), ("KL_COEF", "abc", "KL_COEF"),
                                               ("KL_COEF", "-1", "KL_COEF"), ("KL_COEF", "nan", "KL_COEF"),
                                               ("BASELINE_STATS_PATH", "/nonexistent/stats.json", "BASELINE_STATS_PATH"),
                                               ("MINER_DATASETS", "ok,../escape", "MINER_DATASETS")])
def test_malformed_validator_environment_stops_the_run_with_its_name(name, value, reason, monkeypatch, capsys):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=reason):
        load_tournament_env()
    assert main(_args("t", "m", "d", {"field_instruction": "i"}, "InstructTextTask")) == 2
    assert reason in capsys.readouterr().err


@pytest.mark.parametrize("size,task,gpus,method", [("0.5B", "InstructTextTask", 1, "full"),
                                                    ("8B", "DpoTask", 2, "lora"),
                                                    ("32B", "InstructTextTask", 4, "lora_zero3"),
                                                    ("70B", "InstructTextTask", 8, "lora_zero3")])
def test_every_visible_gpu_trains_with_the_clusters_planner(size, task, gpus, method, tmp_path, base_model, demo_task,
                                                            roots, monkeypatch):
    """The tournament's own preparation on a model folder of the real shape (configs only, the bench
    tokenizer): one worker per GPU, the method the capacity planner picks, and why, logged."""
    from transformers import AutoConfig

    model = tmp_path / size
    model.mkdir()
    for f in Path(base_model).glob("tokenizer*"):
        shutil.copy(f, model / f.name)
    AutoConfig.for_model(**CONFIGS[size]).save_pretrained(model)
    task_id = str(uuid.uuid4())
    rows = demo_task["train"][:40]
    dataset_type = demo_task["dataset_type"]
    if task == "DpoTask":
        rows = [{"prompt": r["instruct"], "chosen": r["output"], "rejected": r["output"][::-1] + " no"} for r in rows]
        dataset_type = {"field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected"}
    (roots[1] / "datasets" / f"{task_id}_train_data.json").write_text(json.dumps(rows))
    hw = Hardware(gpus, H100, 79.2, 24 * gpus, 110 * gpus * 1024**3, (16 if gpus >= 4 else 8) * 1024**3)
    args = parse_args(_args(task_id, model, "https://s3.example/x.json", dataset_type, task), load_tournament_env())
    job, cfg, run_plan = prepare(args, load_settings(), load_tournament_env(), hw, tmp_path / "work", time.time())
    assert (cfg.num_workers, cfg.use_gpu, run_plan.method) == (gpus, True, method)
    assert cfg.method == ("full" if method == "full" else "lora") and cfg.zero_stage == (3 if method == "lora_zero3" else 0)
    assert str(gpus) in run_plan.why[0] and ("ZeRO-3" in run_plan.why[1]) == (method == "lora_zero3")
    # the local Ray instance is the container's size: these workers' bundles fit it
    kwargs = ray_init_kwargs(hw)
    assert (kwargs["num_gpus"], kwargs["num_cpus"]) == (gpus, 24 * gpus)
    assert cfg.num_workers * cfg.cpus_per_worker <= kwargs["num_cpus"]
    # a per-sample duel: the trained weights go out whenever dev says better (no 2-SE base guard)
    assert cfg.base_margin_se == 0.0 < TrainConfig.base_margin_se
    assert cfg.soup_runs == 3 > TrainConfig.soup_runs  # the window's unspent time as more runs, averaged
    monkeypatch.setenv("MINER_TRAIN_OPTIONS", '{"base_margin_se": 1.5}')  # the operator's word is the last
    _, cfg, _ = prepare(args, load_settings(), load_tournament_env(), hw, tmp_path / "work", time.time())
    assert cfg.base_margin_se == 1.5


def test_validator_gpu_grant_matches_gpu_requirements():
    """validator/tournament/gpu_requirements.py: params_B x (DPO 3, GRPO 2, KL 2): <=4 -> 1, <=12 -> 2, <=40 -> 4, else 8."""
    assert [validator_gpus(p * 1e9, "InstructTextTask") for p in (0.5, 4, 4.1, 12, 12.5, 40, 41)] == [1, 1, 2, 2, 4, 4, 8]
    assert validator_gpus(8e9, "DpoTask") == 4 and validator_gpus(8e9, "GrpoTask") == 4
    assert validator_gpus(3e9, "InstructTextTask", use_kl=True) == 2 and validator_gpus(3e9, "InstructTextTask") == 1
    assert validator_gpus(3e9, "DpoTask", use_kl=True) == 2  # DPO's own factor, not the KL one


def _fake_checkpoint(path: Path, value: float, size: int = 4096) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.full((size,), value)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "train_state.pt").write_bytes(b"optimizer state")
    (path / "metrics.json").write_text("{}")
    return path


def _look(out: Path) -> bool | None:
    """Whether `out` holds exactly one complete model and nothing else of weight, read through one
    directory handle; None when that directory was swapped out (and is being deleted) while we
    looked: a reader after the kill never sees that, the uploader runs once the trainer is gone."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = os.listdir(fd)
        weights = [n for n in names if n.endswith(".safetensors")]
        subdirs = [n for n in names if stat.S_ISDIR(os.stat(n, dir_fd=fd).st_mode)]
        ok = len(weights) == 1 and not subdirs and "train_state.pt" not in names
        if ok:
            f = os.open(weights[0], os.O_RDONLY, dir_fd=fd)
            with os.fdopen(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
                size = os.fstat(fh.fileno()).st_size
            ok = size == 8 + n + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    except (FileNotFoundError, ValueError):
        ok = False
    swapped = os.fstat(fd).st_ino != os.stat(out).st_ino  # no longer the output folder (being deleted)
    os.close(fd)
    return None if swapped else ok


@pytest.mark.ray
def test_a_full_fine_tune_with_time_left_trains_a_seed_soup_and_leaves_one_model(roots, base_model, demo_task,
                                                                                monkeypatch, capsys):
    """The entrypoint end to end on the CPU, with the full fine-tune a GPU would plan (the operator's
    option here, and 2 runs for the test's time): the window holds another run, it trains, the dev choice is the one model in the
    output folder, and the runs' folders leave the validator's volume."""
    monkeypatch.setenv("MINER_TRAIN_OPTIONS", '{"method": "full", "epochs": 1, "lr": 1e-4, "soup_runs": 2}')
    task_id = str(uuid.uuid4())
    (roots[1] / "datasets" / f"{task_id}_train_data.json").write_text(json.dumps(demo_task["train"][:200]))
    import ray

    try:  # the limit counts from this process's start (the suite's): 2 hours leave the window wide open
        assert main(_args(task_id, base_model, "https://s3.example/x.json", demo_task["dataset_type"], "InstructTextTask",
                          hours="2")) == 0
    finally:
        ray.shutdown()  # the entrypoint's own Ray instance (a container's process would just exit)
    log = capsys.readouterr().out
    work = roots[0] / task_id / ".work"
    soup = json.loads((work / "soup.json").read_text())
    assert soup["runs"] == 2 and "[soup] run 2 of up to 2" in log, log[-2000:]
    assert soup["chosen"] in ("average", "run 1", "run 2")
    assert json.loads((work / "summary.json").read_text())["soup"] == soup
    out = roots[0] / task_id / "tournament-x"
    assert model_folders(out) == [out] and checkpoint_is_complete(out)
    assert sorted(p.name for p in (roots[0] / task_id).iterdir()) == [".work", "tournament-x"]
    assert not (work / "runs").exists() and not (work / "model").exists()


def test_output_folder_holds_exactly_one_complete_model_at_every_moment(tmp_path):
    """Exports swap a whole model in with one rename: a reader (the uploader, or a kill) never finds
    the folder missing, half-copied, or holding a checkpoint sub-folder or resume state."""
    a, b = _fake_checkpoint(tmp_path / "a", 1.0, 200_000), _fake_checkpoint(tmp_path / "b", 2.0, 300_000)
    out = tmp_path / "task" / "repo"
    export_checkpoint(a, out)
    stop, looks = threading.Event(), []

    def exporter():
        i = 0
        while not stop.is_set():
            export_checkpoint((a, b)[i % 2], out)
            i += 1

    t = threading.Thread(target=exporter)
    t.start()
    try:
        while len(looks) < 3000:
            looks.append(_look(out))
    finally:
        stop.set()
        t.join()
    assert all(x in (True, None) for x in looks), looks.count(False)
    assert checkpoint_is_complete(out) and upload_candidate(out) == out and model_folders(out) == [out]
    assert sorted(p.name for p in out.parent.iterdir()) == ["repo"]  # no .partial/.old left behind


def test_the_uploader_would_take_a_checkpoint_sub_folder_over_the_top_level(tmp_path):
    """Why the output never holds sub-folders: G.O.D's uploader prefers the first one with weights."""
    out = _fake_checkpoint(tmp_path / "repo", 1.0)
    assert upload_candidate(out) == out
    _fake_checkpoint(out / "checkpoint-10", 3.0)
    assert upload_candidate(out) == out / "checkpoint-10"
    assert upload_candidate(tmp_path / "empty") is None


def test_the_image_runs_this_module_where_the_validator_looks():
    from cluster.console.registration import DOCKERFILES

    primary, legacy = (REPO / p for p in DOCKERFILES)
    assert primary.is_file() and legacy.resolve() == primary.resolve()
    assert 'ENTRYPOINT ["python", "-m", "trainers.tournament"]' in primary.read_text()


def test_the_image_pins_what_pyproject_allows_and_phones_nowhere():
    """Every dependency of pyproject.toml is pinned in the image at a version its range allows; the
    image keeps Ray's usage stats, the Hugging Face libraries and W&B offline."""
    import tomllib
    from packaging.requirements import Requirement

    wanted = {Requirement(r).name.lower(): Requirement(r) for r in
              tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    pins = {}
    for line in (REPO / "ops" / "docker" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower()] = next(iter(req.specifier)).version
    assert set(wanted) <= set(pins), set(wanted) - set(pins)
    for name, req in wanted.items():
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(req.specifier))
    assert "wandb" not in pins
    from cluster.console.tournament_sim import image_env

    env = image_env()
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["HF_HUB_OFFLINE"] == "1" and env["HOME"].startswith("/tmp")
