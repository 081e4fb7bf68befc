"""Miner settings from the environment: G.O.D's names where they exist, MINER_* for ours."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Ray Train V2 (Ray 2.60) patches print() in its workers to log through the root logger, and
# also prints the line itself when sys.stdout is not sys.__stdout__, which in a Ray worker it
# never is (Ray wraps it in Unbuffered): every training-worker line came out twice. Off, print
# is print. Set in the runtime_env of every Ray Job and local Ray instance that trains, so it
# reaches the driver, the Train controller and the workers alike.
RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def env(name: str, default: str | None = None) -> str | None:
    """One environment variable, empty counting as unset. The only reader of os.environ in the
    miner: process-level switches that are not Settings fields (Ray's address, the demo model,
    the access log) read it through here, so every variable the miner honours is found here."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_subset(names) -> dict[str, str]:
    """The named variables as set (empty ones too): what a child process inherits on purpose."""
    return {k: v for k, v in os.environ.items() if k in names}


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    metagraph_file: Path | None
    miner_hotkey: str | None
    wallet_name: str | None
    hotkey_name: str | None
    netuid: int
    subtensor_network: str
    min_stake_threshold: float
    hf_token: str | None
    hf_username: str | None
    hub_dir: Path
    max_dataset_bytes: int
    num_workers: int
    use_gpu: bool
    max_hours: float
    min_hours: float
    training_repo: str | None            # /training_repo/text: the repository validators build ...
    training_commit: str | None          # ... at this full 40-hex commit (None: unset, the route answers 503)
    train_labels: dict[str, str] = field(default_factory=dict)  # Ray node labels training must run on
    # reliability (issue #8): caches, the deadline watchdog, model lookups at offer time
    cache_max_bytes: int = 200 * 1024**3          # models + finished jobs' folders, LRU beyond this
    upload_bandwidth_bytes_s: float = 20e6         # for the watchdog's upload-time estimate
    watchdog_margin_s: float = 60.0                # kept on top of the upload estimate (capped at 3% of a job)
    model_lookup: str = "hub"                      # "hub": check offered HF ids' config.json; "off"
    search_share: float = 0.2          # share of a job's training window for the LR/rank search
    prefetch_jobs: int = 2             # queued jobs whose inputs download while others train (0: off)
    prefetch_models: bool = True       # also snapshot their HF base models into the model cache
    train_options: dict = field(default_factory=dict)  # TrainConfig fields set on every job (MINER_TRAIN_OPTIONS)
    training_github_token: str | None = None  # only for a private training repo (MINER_TRAINING_GITHUB_TOKEN_FILE)
    hf_offline: bool = False           # HF_HUB_OFFLINE=1: never reach for the Hub (the tournament container)
    tmp_dir: str = "/tmp"              # TMPDIR: Ray's session files in the tournament container
    cluster_shape: str | None = None   # MINER_CLUSTER: a declared shape ("2x8xH100"), fixed; None: ask Ray
    reservation_ttl_s: float = 3600.0  # MINER_RESERVATION_TTL_S: how long an accepted offer holds its GPUs

    def training_repo_problem(self) -> str | None:
        """Why /training_repo/text cannot be answered (None: it can)."""
        if not self.training_repo or not self.training_commit:
            return ("MINER_TRAINING_REPO and MINER_TRAINING_COMMIT are not set: validators cannot enrol this miner "
                    "in tournaments (docs/operator-guide.md, section 0: from fork to registered entry)")
        return None

    @property
    def db_path(self) -> Path:
        return self.state_dir / "miner.db"

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def model_cache_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def publishes_to_hf(self) -> bool:
        return bool(self.hf_token and self.hf_username)

    def job_dir(self, task_id: str) -> Path:
        return self.jobs_dir / task_id

    def as_env(self) -> dict[str, str]:
        """The variables a Ray Job or Serve replica needs to rebuild these settings on any node.
        Secrets travel as a path to a 0600 file in the state dir (shared storage on a cluster):
        runtime_env variables are displayed by the Ray dashboard and `ray job list`."""
        keep = {k: v for k, v in os.environ.items()
                if (k.startswith("MINER_") or k in _GOD_NAMES) and k not in _SECRETS}
        keep["MINER_STATE_DIR"] = str(self.state_dir)
        keep["MINER_HUB_DIR"] = str(self.hub_dir)
        if self.hf_token:
            keep["MINER_HF_TOKEN_FILE"] = str(write_secret(self.state_dir / "secrets" / "hf_token", self.hf_token))
        return keep


_GOD_NAMES = ("WALLET_NAME", "HOTKEY_NAME", "NETUID", "SUBTENSOR_NETWORK", "MIN_STAKE_THRESHOLD",
              "HUGGINGFACE_TOKEN", "HUGGINGFACE_USERNAME")
_SECRETS = ("HUGGINGFACE_TOKEN",)


def write_secret(path: Path, value: str) -> Path:
    """Owner-only file, replaced atomically (a reader never sees half a token)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.replace(tmp, path)
    return path


def _secret(name: str, file_variable: str) -> str | None:
    """A secret from its variable, else from the file a parent process handed down."""
    value, path = env(name), env(file_variable)
    if value or not path or not Path(path).is_file():
        return value
    return Path(path).read_text().strip() or None


def load_settings() -> Settings:
    state_dir = Path(env("MINER_STATE_DIR", "~/.miner")).expanduser().resolve()
    metagraph = env("MINER_METAGRAPH_FILE")
    return Settings(
        state_dir=state_dir,
        metagraph_file=Path(metagraph).expanduser().resolve() if metagraph else None,
        miner_hotkey=env("MINER_HOTKEY"),
        wallet_name=env("WALLET_NAME"),
        hotkey_name=env("HOTKEY_NAME"),
        netuid=int(env("NETUID", "56")),
        subtensor_network=env("SUBTENSOR_NETWORK", "finney"),
        min_stake_threshold=float(env("MIN_STAKE_THRESHOLD", "1000")),
        hf_token=_secret("HUGGINGFACE_TOKEN", "MINER_HF_TOKEN_FILE"),
        hf_username=env("HUGGINGFACE_USERNAME"),
        hub_dir=Path(env("MINER_HUB_DIR", str(state_dir / "hub"))).expanduser().resolve(),
        max_dataset_bytes=int(env("MINER_MAX_DATASET_BYTES", str(2 * 1024**3))),
        num_workers=int(env("MINER_TRAIN_WORKERS", "1")),
        # "1": train on GPUs even when this process (a CPU head's job driver) sees none
        use_gpu=env("MINER_USE_GPU", "auto") in ("1", "true") or (env("MINER_USE_GPU", "auto") == "auto" and _gpu_available()),
        max_hours=float(env("MINER_MAX_HOURS", "48")),
        min_hours=float(env("MINER_MIN_HOURS", "0.02")),
        training_repo=env("MINER_TRAINING_REPO"),
        training_commit=_commit(env("MINER_TRAINING_COMMIT")),
        training_github_token=_secret("MINER_TRAINING_GITHUB_TOKEN", "MINER_TRAINING_GITHUB_TOKEN_FILE"),
        hf_offline=env("HF_HUB_OFFLINE", "0") in ("1", "true", "True", "yes"),
        tmp_dir=tempfile.gettempdir(),
        train_labels=parse_labels(env("MINER_TRAIN_LABELS", "")),
        cache_max_bytes=int(float(env("MINER_CACHE_MAX_GB", "200")) * 1024**3),
        upload_bandwidth_bytes_s=float(env("MINER_UPLOAD_MBPS", "20")) * 1e6,
        watchdog_margin_s=float(env("MINER_WATCHDOG_MARGIN_S", "60")),
        model_lookup=env("MINER_MODEL_LOOKUP", "hub"),
        search_share=float(env("MINER_SEARCH_SHARE", "0.2")),
        prefetch_jobs=int(env("MINER_PREFETCH_JOBS", "2")),
        prefetch_models=env("MINER_PREFETCH_MODELS", "1") in ("1", "true"),
        train_options=parse_train_options(env("MINER_TRAIN_OPTIONS", "")),
        cluster_shape=env("MINER_CLUSTER"),
        reservation_ttl_s=float(env("MINER_RESERVATION_TTL_S", "3600")),
    )


def _commit(value: str | None) -> str | None:
    """A full 40-hex SHA, as the validator requires (branch names and short SHAs are refused)."""
    if value is not None and not re.fullmatch(r"[0-9a-fA-F]{40}", value):
        raise ValueError(f"MINER_TRAINING_COMMIT must be a full 40-hex commit SHA (validators refuse branch "
                         f"names and short SHAs), not {value!r}")
    return value.lower() if value else None


@dataclass(frozen=True)
class TournamentEnv:
    """What the validator's trainer container passes besides the CLI (gradients-protocol.md §13;
    G.O.D trainer/runtime.py). Read here only; a malformed value stops the run with its reason."""
    output_root: Path = Path("/app/checkpoints")  # TOURNAMENT_OUTPUT_ROOT: the uploaded volume (tests move it)
    cache_root: Path = Path("/cache")             # TOURNAMENT_CACHE_ROOT: the downloader's read-only volume
    use_kl: bool = False                  # USE_KL=1: scored as eval_loss + KL_COEF x KL(finetuned || base)
    kl_coef: float | None = None          # KL_COEF (0.1-1.5 on synthetic tasks); unset: no KL term is scored
    baseline_stats: dict | None = None    # BASELINE_STATS_PATH's JSON: set when the base was weight-augmented
    miner_datasets: tuple[Path, ...] = ()  # MINER_DATASETS_DIR/<name> for each name in MINER_DATASETS
    wandb: dict = field(default_factory=dict)  # WANDB_*: where offline W&B runs would go (we log none)
    export_poll_s: float = 5.0            # TOURNAMENT_EXPORT_POLL_S: how often a better checkpoint is exported

    @property
    def kl_weight(self) -> float:
        """The KL coefficient the score carries (0 when the task is not KL-weighted)."""
        return self.kl_coef if self.use_kl and self.kl_coef else 0.0


def load_tournament_env() -> TournamentEnv:
    use_kl = env("USE_KL", "0")
    if use_kl not in ("0", "1", "true", "false"):
        raise ValueError(f"USE_KL must be 1 or 0, not {use_kl!r}")
    coef = env("KL_COEF")
    kl_coef = None
    if coef is not None:
        try:
            kl_coef = float(coef)
        except ValueError:
            raise ValueError(f"KL_COEF must be a number, not {coef!r}") from None
        if not math.isfinite(kl_coef) or kl_coef < 0:
            raise ValueError(f"KL_COEF must be a finite number >= 0, not {coef!r}")
    stats = None
    stats_path = env("BASELINE_STATS_PATH")
    if stats_path:
        try:
            stats = json.loads(Path(stats_path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"BASELINE_STATS_PATH {stats_path!r} is not a readable JSON file: {e}") from None
        if not isinstance(stats, dict):
            raise ValueError(f"BASELINE_STATS_PATH {stats_path!r} holds a JSON {type(stats).__name__}, not an object")
    names = [n.strip() for n in (env("MINER_DATASETS", "") or "").split(",") if n.strip()]
    bad = [n for n in names if "/" in n or n in (".", "..")]
    if bad:
        raise ValueError(f"MINER_DATASETS names folders under MINER_DATASETS_DIR; these cannot be folder names: {bad}")
    datasets_dir = Path(env("MINER_DATASETS_DIR", "/cache/miner_datasets"))
    return TournamentEnv(
        output_root=Path(env("TOURNAMENT_OUTPUT_ROOT", "/app/checkpoints")),
        cache_root=Path(env("TOURNAMENT_CACHE_ROOT", "/cache")),
        use_kl=use_kl in ("1", "true"), kl_coef=kl_coef, baseline_stats=stats,
        miner_datasets=tuple(datasets_dir / n for n in names),
        wandb={k: v for k, v in os.environ.items() if k.startswith("WANDB_")},
        export_poll_s=float(env("TOURNAMENT_EXPORT_POLL_S", "5")))


# What the planner and the job decide (data, deadline, placement): not an operator's option.
_NOT_OPTIONS = {"model_path", "train_file", "dataset_type", "task_type", "run_dir", "run_name", "train_deadline",
                "progress_file", "num_workers", "use_gpu", "cpus_per_worker", "accelerator_type", "label_selector",
                "extra", "zero_stage", "n_params", "search", "search_trial"}


def parse_train_options(text: str) -> dict:
    """MINER_TRAIN_OPTIONS: a JSON object of trainers.config.TrainConfig fields applied over the
    planner's choices on every job, e.g. '{"dev_pass": true, "lora_layer_rank": "probe"}'. Unknown
    fields, fields the planner owns and values of the wrong type are refused at start-up."""
    if not text.strip():
        return {}
    from trainers.config import TrainConfig

    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"MINER_TRAIN_OPTIONS is not JSON: {e}") from None
    if not isinstance(options, dict):
        raise ValueError("MINER_TRAIN_OPTIONS must be a JSON object of TrainConfig fields")
    defaults = TrainConfig(model_path="", train_file="", dataset_type={})
    problems = []
    for name, value in options.items():
        if name not in TrainConfig.__dataclass_fields__ or name in _NOT_OPTIONS:
            problems.append(f"{name!r} is not an option")
            continue
        want = type(getattr(defaults, name))
        if name == "grpo":  # GrpoSettings' fields as a JSON object, checked by the dataclass itself
            problems += _grpo_problems(value)
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool)) \
            or (want is float and isinstance(value, int) and not isinstance(value, bool)) \
            or (name == "lora_targets" and isinstance(value, list))
        if not ok:
            problems.append(f"{name!r} must be {want.__name__}, not {type(value).__name__}")
    if problems:
        raise ValueError("MINER_TRAIN_OPTIONS: " + "; ".join(problems))
    return options


def _grpo_problems(value) -> list[str]:
    from trainers.config import GrpoSettings

    if not isinstance(value, dict):
        return [f"'grpo' must be an object of GrpoSettings fields, not {type(value).__name__}"]
    try:
        GrpoSettings(**value)
    except (TypeError, ValueError) as e:
        return [f"'grpo': {e}"]
    return []


def parse_labels(text: str) -> dict[str, str]:
    """`key=value,key2=value2` (the `ray start --labels` format) as a dict."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0].strip()]
    if bad:
        raise ValueError(f"MINER_TRAIN_LABELS must look like key=value,key2=value2; bad part(s): {bad}")
    return {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
