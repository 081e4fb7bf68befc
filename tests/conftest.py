import json
import os
from pathlib import Path

import pytest

# Ray in tests: no token auth, no usage stats, one thread per torch process (2-core CI).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MINER_PREFETCH_MODELS", "0")   # prefetch never reaches for the Hub in tests

REPO = Path(__file__).resolve().parents[1]
DEMO_TASK = REPO / "cluster" / "console" / "demo_task"
BENCH = REPO.parent / "shared" / "bench"


@pytest.fixture(scope="session")
def demo_task() -> dict:
    meta = json.loads((DEMO_TASK / "task.json").read_text())
    return {"path": DEMO_TASK, "dataset_type": meta["dataset_type"], "task_type": meta["task_type"],
            "train": json.loads((DEMO_TASK / "train.json").read_text()),
            "test": json.loads((DEMO_TASK / "test.json").read_text())}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of several families, built from configs (no hub)."""
    from cluster.console.demo_model import build_tiny_model, texts_from_task

    root = tmp_path_factory.mktemp("tiny")
    texts = texts_from_task(DEMO_TASK)
    return {fam: build_tiny_model(root / fam, texts, fam, bos_prefix=(fam == "llama"))
            for fam in ("llama", "qwen2", "mistral", "gpt2")}


@pytest.fixture(scope="session")
def base_model(tiny_models) -> Path:
    """The pretrained bench model when ../shared is there, else a tiny built one."""
    pico = BENCH / "models" / "pico-llama"
    return pico if (pico / "config.json").exists() else tiny_models["qwen2"]


@pytest.fixture()
def api_env(tmp_path, monkeypatch, base_model):
    """The FastAPI app wired to a real control plane and SQLite store, a real sr25519 validator
    (stake 5000), a low-stake one (10) and the miner's own key. No Ray: jobs go to `runner`."""
    from fastapi.testclient import TestClient
    from substrateinterface import Keypair

    from cluster.console.simulate import register_validator
    from cluster.control import ControlPlane
    from cluster.settings import load_settings
    from serve_app.api import api
    from serve_app.auth import Authenticator
    from serve_app.wiring import install

    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MINER_METAGRAPH_FILE", str(tmp_path / "metagraph.json"))
    monkeypatch.setenv("MIN_STAKE_THRESHOLD", "1000")
    monkeypatch.setenv("MINER_TRAINING_REPO", "https://github.com/example/miner")
    monkeypatch.setenv("MINER_TRAINING_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    validator, poor, miner = (Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for _ in range(3))
    register_validator(tmp_path / "metagraph.json", validator.ss58_address, 5000)
    register_validator(tmp_path / "metagraph.json", poor.ss58_address, 10)
    settings = load_settings()
    runner = RecordingRunner()
    control = ControlPlane(settings, runner=runner)
    install(control, Authenticator(settings, miner.ss58_address))
    return {"client": TestClient(api), "validator": validator, "poor": poor, "miner": miner, "control": control,
            "model": str(base_model), "runner": runner}


class RecordingRunner:
    """The Ray Job runner's interface, recording submissions instead of starting Ray (API tests only;
    tests/test_end_to_end.py runs the real one)."""

    def __init__(self):
        self.submitted: list[str] = []

    def submit(self, job, settings) -> str:
        self.submitted.append(job.task_id)
        return job.submission_id

    def status(self, submission_id):
        return "PENDING", ""


@pytest.fixture()
def short_fit():
    """fit() in local mode on 120 demo rows, one epoch, a small LoRA: the options under test vary."""
    from trainers.config import TrainConfig
    from trainers.launch import fit

    def run(tmp_path, model, demo_task, name, **options):
        train_file = tmp_path / "train.json"
        train_file.write_text(json.dumps(demo_task["train"][:120]))
        options = {"lr": 3e-3, "epochs": 1, "saves": 2, "batch_tokens": 2048, "lora_r": 4, "lora_alpha": 8, **options}
        cfg = TrainConfig(model_path=str(model), train_file=str(train_file), dataset_type=demo_task["dataset_type"],
                          run_dir=str(tmp_path / "runs"), run_name=name, num_workers=0, **options)
        return fit(cfg, tmp_path / name)

    return run


@pytest.fixture()
def idle_decide():
    """Admission of one request on an idle cluster of this machine's (or MINER_CLUSTER's) shape:
    no queue, no knowledge, the config only from disk (the capability check that
    cluster.planning.admission.decide was, before the control plane owned every admission)."""
    from cluster.planning.admission import Admission, Limits, Request
    from cluster.planning.knowledge import local_config
    from cluster.planning.ledger import initial_view
    from cluster.planning.scheduling import Scheduler

    def decide(task_type, model, hours, settings):
        adm = Admission(Scheduler(initial_view(settings.use_gpu, settings.num_workers, settings.cluster_shape)),
                        limits=Limits(settings.min_hours, settings.max_hours, settings.num_workers))
        return adm.decide(Request("capability-check", task_type, model, hours, None,
                                  local_config(model, settings.model_cache_dir)))

    return decide
