import json
import os
from pathlib import Path

import pytest

# Ray in tests: no token auth, no usage stats, one thread per torch process (2-core CI).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEMO_TASK = REPO / "cluster" / "demo_task"
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
    from cluster.demo_model import build_tiny_model, texts_from_task

    root = tmp_path_factory.mktemp("tiny")
    texts = texts_from_task(DEMO_TASK)
    return {fam: build_tiny_model(root / fam, texts, fam, bos_prefix=(fam == "llama"))
            for fam in ("llama", "qwen2", "mistral", "gpt2")}


@pytest.fixture(scope="session")
def base_model(tiny_models) -> Path:
    """The pretrained bench model when ../shared is there, else a tiny built one."""
    pico = BENCH / "models" / "pico-llama"
    return pico if (pico / "config.json").exists() else tiny_models["qwen2"]
