"""cluster.yaml and serve_config.yaml pass Ray's own schema validation."""
import importlib

import yaml

from conftest import REPO


def test_cluster_yaml_is_valid_for_the_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] > 0  # no 0-CPU head trap


def test_serve_config_matches_the_schema_and_imports():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve_config.yaml").read_text()))
    app = schema.applications[0]
    module, attr = app.import_path.split(":")
    built = getattr(importlib.import_module(module), attr)(app.args)
    assert type(built).__name__ == "Application"
