"""cluster.yaml and serve_config.yaml pass Ray's own validation and agree with each other and
with `miner serve`; no secret is written in either."""
import copy
import importlib
import re

import pytest
import yaml
from conftest import REPO

from cluster.console.embedded import APP_IMPORT_PATH, APP_NAME
from cluster.settings import parse_labels

CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
SERVE = yaml.safe_load((REPO / "serve_config.yaml").read_text())
SECRET_PATTERNS = [r"hf_[A-Za-z0-9]{20,}", r"(TOKEN|PASSWORD|SECRET)\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{16,}",
                   r"\b5[1-9A-HJ-NP-Za-km-z]{47}\b", r"(\b[a-z]{3,8}\b ){11}\b[a-z]{3,8}\b"]  # token, key, ss58, mnemonic


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_ray_cluster_launcher_validation():
    _validate(CLUSTER)
    broken = copy.deepcopy(CLUSTER)
    broken["available_node_types"]["gpu_8x_h100"]["resources"]["GPU"] = 0.5  # Ray wants integers
    with pytest.raises(Exception, match="integer"):
        _validate(broken)


def test_cluster_node_types_cpu_head_and_1_2_8_h100_workers():
    types = CLUSTER["available_node_types"]
    head = types[CLUSTER["head_node_type"]]
    assert head["resources"]["CPU"] > 0 and head["resources"].get("GPU", 0) == 0  # no 0-CPU head trap
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert sorted(t["resources"]["GPU"] for t in gpu_types.values()) == [1, 2, 8]
    train_labels = parse_labels(SERVE["applications"][0]["runtime_env"]["env_vars"]["MINER_TRAIN_LABELS"])
    for name, t in gpu_types.items():
        assert not any(k.startswith("accelerator_type") for k in t["resources"]), name  # a marker, not a count
        assert t.get("min_workers", 0) == 0 and t["max_workers"] >= 1, name             # autoscaling bounds
        assert train_labels.items() <= t["labels"].items(), name                       # training may land here
    assert not train_labels.items() <= head.get("labels", {}).items()                  # ... and never on the head
    assert sum(t["max_workers"] for t in gpu_types.values()) >= CLUSTER["max_workers"] > 0


def test_cluster_installs_the_miner_and_starts_ray_with_metrics_on_every_node():
    mounted = {remote for remote, local in CLUSTER["file_mounts"].items() if local == "."}
    install = CLUSTER["head_setup_commands"] + CLUSTER["worker_setup_commands"]
    assert mounted and all(any(f"pip install -q -e {m}" in c for c in install) for m in mounted)
    assert any("pip install" in c and m in c for c in CLUSTER["worker_setup_commands"] for m in mounted)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = CLUSTER[key][-1]
        assert "ray start" in start and "--metrics-export-port=" in start and "WORKER_GROUP_START_TIMEOUT_S" in start
    assert "--autoscaling-config" in CLUSTER["head_start_ray_commands"][-1]


def test_secrets_only_by_reference():
    for name in ("cluster.yaml", "serve_config.yaml"):
        text = (REPO / name).read_text()
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, text), (name, pattern)
    # secrets come from the operator's files: mounts point at paths outside the repository
    secret_mounts = {r: l for r, l in CLUSTER["file_mounts"].items() if l != "."}
    assert secret_mounts and all(l.startswith("~/") for l in secret_mounts.values())
    env = SERVE["applications"][0]["runtime_env"]["env_vars"]
    assert not {"HUGGINGFACE_TOKEN", "MINER_HOTKEY"} & set(env)


def test_serve_config_deploys_what_miner_serve_deploys():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(SERVE)
    app = schema.applications[0]
    assert (app.name, app.import_path) == (APP_NAME, APP_IMPORT_PATH)
    module, attr = app.import_path.split(":")
    built = getattr(importlib.import_module(module), attr)(app.args)
    assert type(built).__name__ == "Application"
    head_resources = CLUSTER["available_node_types"][CLUSTER["head_node_type"]]["resources"]
    for dep in app.deployments:  # the API asks only for what the head has
        wanted = dep.ray_actor_options.resources or {}
        assert wanted and all(head_resources.get(k, 0) >= v for k, v in wanted.items())
        assert (dep.ray_actor_options.num_cpus or 0) <= head_resources["CPU"]


def test_the_hf_token_reaches_jobs_as_a_file_never_as_a_displayed_variable(tmp_path, monkeypatch):
    import os
    import stat

    from cluster.settings import load_settings

    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "hf_secret_value")
    env = load_settings().as_env()
    assert not any("hf_secret_value" in v for v in env.values())  # runtime_env is shown by the dashboard
    token_file = env["MINER_HF_TOKEN_FILE"]
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    # a Ray Job's process rebuilds the settings from that env alone
    monkeypatch.delenv("HUGGINGFACE_TOKEN")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_settings().hf_token == "hf_secret_value"
