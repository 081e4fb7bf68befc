"""`miner simulate --tournament`: runs our trainer the way a G.O.D validator runs it, then scores it.

The validator's steps (gradients-protocol.md §13; G.O.D trainer/runtime.py, trainer/containers/
uploader.py): the downloader fills /cache (the model under a salted 16-hex folder name when the
base was prepared, the data as `<task_id>_train_data.json`); the container starts with the CLI
arguments, the image's environment, `USE_KL`/`KL_COEF` for KL-weighted tasks, no network and no
capabilities (`--sandbox`, as root), and is killed at hours × 3600 s (a kill counts as success);
the uploader takes the first sub-folder holding `.safetensors`, else the folder itself, and
refuses an empty one. The "upload" here is a copy with `adapter_config.json` pointed at the base,
scored with the validator's metric for the task on its test.json.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.console.simulate import TaskSpec
from cluster.jobs.container import (
    APP_CHECKPOINTS,
    CACHE,
    Sandbox,
    cache_model_name,
    ensure_mountpoints,
    lay_out_cache,
    model_folders,
    run_with_limit,
    sandbox_problem,
    upload_candidate,
)
from cluster.jobs.hub import point_adapter_at_base
from cluster.settings import env_subset

DOCKERFILE = Path(__file__).resolve().parents[2] / "ops" / "docker" / "standalone-text-trainer.dockerfile"
KEEP_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
            "RAY_AUTH_MODE", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


@dataclass
class TournamentOutcome:
    task: str
    task_type: str
    exit_code: int | None      # None: killed at the limit
    killed: bool
    seconds: float
    limit_s: float
    uploaded: bool
    base_metric: float | None = None
    submission_metric: float | None = None
    detail: str = ""

    @property
    def succeeded(self) -> bool:
        """What the validator records: a clean exit or a kill at the limit, and something to upload."""
        return (self.killed or self.exit_code == 0) and self.uploaded


def image_env(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    """The ENV lines of our image, so a local run sees the HOME and caches the container has."""
    text = dockerfile.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for word in shlex.split(line.strip()[4:]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def trainer_args(task_id: str, model_arg: str, dataset_url: str, spec: TaskSpec, repo_name: str,
                 hours: float) -> list[str]:
    """The validator's argument list, in its order, hours as str(float)."""
    return ["--task-id", task_id, "--model", model_arg, "--dataset", dataset_url,
            "--dataset-type", json.dumps(spec.dataset_type), "--task-type", spec.task_type.value,
            "--file-format", "s3", "--expected-repo-name", repo_name, "--hours-to-complete", str(float(hours))]


@dataclass
class ContainerRun:
    """One run's knobs: where its folders go, and what the validator would set."""
    work: Path                          # this run's host folder (cache/, checkpoints/, tmp/, logs)
    hours: float
    kill_after_s: float | None = None   # the validator's kill; default hours x 3600
    gpus: int | None = None             # CUDA_VISIBLE_DEVICES=0..gpus-1 (None: as this process sees them)
    kl_coef: float | None = None        # USE_KL=1, KL_COEF=c
    salt: str = "sim-salt"              # a prepared base: the model folder is a salted hash ("": org--name)
    sandbox: bool = False               # no network, no capabilities, read-only everything but the volumes


def run_container(spec: TaskSpec, model_dir: Path, model_id: str, run: ContainerRun, on_tick=None):
    """Lays out /cache, runs `python -m trainers.tournament` as the validator would and returns
    (RunResult, the output folder on the host, task_id)."""
    task_id, repo_name = str(uuid.uuid4()), f"tournament-sim-{uuid.uuid4().hex[:8]}"
    cache, checkpoints = run.work / "cache", run.work / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    # the container's temp dir: a short path (Ray's unix sockets live there; 107 characters at most)
    tmp = Path(tempfile.mkdtemp(prefix="tsim-", dir="/tmp"))
    (run.work / "tmp").unlink(missing_ok=True)
    (run.work / "tmp").symlink_to(tmp)
    model_name = cache_model_name(model_id, run.salt)
    lay_out_cache(cache, task_id, model_dir, spec.path / "train.json", model_name)
    _scrub_identity(cache / "models" / model_name)
    model_arg = model_name if run.salt else model_id
    env = env_subset(KEEP_ENV)
    env.update(image_env())
    env.update({"TMPDIR": str(tmp), "HOME": str(tmp / "home"), "XDG_CACHE_HOME": str(tmp / "cache"),
                "HF_HOME": str(tmp / "hf"), "TRITON_CACHE_DIR": str(tmp / "triton"), "MINER_STATE_DIR": str(tmp / "miner"),
                "WANDB_MODE": "offline", "PYTHONPATH": _repo_root() + os.pathsep + env.get("PYTHONPATH", "")})
    if run.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(run.gpus))
    if run.kl_coef is not None:
        env.update({"USE_KL": "1", "KL_COEF": str(run.kl_coef)})
    dataset_url = f"https://s3.example/{task_id}_train_data.json?X-Amz-Signature=simulated"
    args = trainer_args(task_id, model_arg, dataset_url, spec, repo_name, run.hours)
    if run.sandbox:
        problem = sandbox_problem()
        if problem:
            raise RuntimeError(problem)
        ensure_mountpoints(APP_CHECKPOINTS, CACHE)
        cmd = Sandbox(mounts={str(APP_CHECKPOINTS): str(checkpoints), str(CACHE): str(cache)},
                      writable=(str(tmp),), read_only=(str(CACHE),)).wrap([sys.executable, "-m", "trainers.tournament", *args])
    else:
        env.update({"TOURNAMENT_OUTPUT_ROOT": str(checkpoints), "TOURNAMENT_CACHE_ROOT": str(cache)})
        cmd = [sys.executable, "-m", "trainers.tournament", *args]
    limit = run.kill_after_s if run.kill_after_s is not None else run.hours * 3600
    result = run_with_limit(cmd, env, limit, run.work / "trainer.log", on_tick)
    return result, checkpoints / task_id / repo_name, task_id


def upload(out_dir: Path, dest: Path, base_model_id: str) -> Path | None:
    """The validator's uploader on our output: which folder, pointed at the base id; None if empty."""
    source = upload_candidate(out_dir)
    if source is None:
        return None
    shutil.copytree(source, dest, dirs_exist_ok=True)
    point_adapter_at_base(dest, base_model_id)
    return dest


def simulate_tournament(spec: TaskSpec, model_dir: Path, run: ContainerRun, log=print) -> TournamentOutcome:
    from trainers.evaluate import METRICS, evaluate_path

    model_id = str(model_dir)  # the "HF id" the uploader writes into the adapter: here the local base
    log(f"[sim] {spec.name}: {spec.task_type.value}, {run.hours * 3600:.0f} s limit"
        + (f", killed at {run.kill_after_s:.0f} s" if run.kill_after_s is not None else "")
        + (", sandboxed (no network, no capabilities)" if run.sandbox else ""))
    result, out_dir, _ = run_container(spec, model_dir, model_id, run)
    uploaded = upload(out_dir, run.work / "uploaded", model_id)
    outcome = TournamentOutcome(spec.name, spec.task_type.value, result.returncode, result.killed,
                                round(result.seconds, 1), run.hours * 3600 if run.kill_after_s is None else run.kill_after_s,
                                uploaded is not None)
    folders = model_folders(out_dir) if out_dir.is_dir() else []
    if uploaded is None:
        outcome.detail = "empty output folder: the upload fails (" + _last_line(result.log) + ")"
    elif folders != [out_dir]:  # the uploader takes the first sub-folder with weights, not our model
        outcome.detail = (f"the output folder holds weights in {[str(f.relative_to(out_dir)) for f in folders]}: "
                          f"the uploader took {upload_candidate(out_dir)}, not the top level")
    elif not (result.killed or result.returncode == 0):
        outcome.detail = f"exit {result.returncode}: " + _last_line(result.log)
    if uploaded is not None and spec.task_type.value in METRICS:
        test, kind = spec.path / "test.json", spec.task_type.value
        kl = run.kl_coef or 0.0  # a KL-weighted task is scored as eval_loss + kl_coef x KL (0 for the base)
        outcome.base_metric = float(evaluate_path(model_dir, model_dir, test, spec.dataset_type, kind, kl))
        outcome.submission_metric = float(evaluate_path(uploaded, model_dir, test, spec.dataset_type, kind, kl))
    (run.work / "outcome.json").write_text(json.dumps(asdict(outcome), indent=2))
    return outcome


def default_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tournament-sim-"))


def _scrub_identity(model_dir: Path) -> None:
    """The downloader removes `_name_or_path` from a prepared model's config."""
    cfg = model_dir / "config.json"
    data = json.loads(cfg.read_text())
    if data.pop("_name_or_path", None) is not None:
        cfg.write_text(json.dumps(data, indent=2))


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _last_line(log: str) -> str:
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    failed = [ln for ln in lines if "FAILED" in ln]
    return (failed or lines or ["no output"])[-1][:300]
