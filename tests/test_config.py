"""TrainConfig checks itself: a bad value fails on construction with the field's name."""
import pytest

from trainers.config import TASK_TYPES, GrpoSettings, TrainConfig


def make(**kw) -> TrainConfig:
    return TrainConfig(model_path="-", train_file="-", dataset_type={}, **kw)


@pytest.mark.parametrize("field, value", [
    ("method", "qlora"), ("task_type", "RlhfTask"), ("zero_stage", 2), ("lr", 0.0), ("lr", -1e-4),
    ("epochs", 0), ("batch_tokens", 0), ("max_batch", 0), ("grad_accum", 0), ("saves", 0),
    ("warmup_fraction", 1.5), ("dev_fraction", -0.1), ("min_lr_ratio", 2.0), ("eval_share", 1.1),
    ("lora_dropout", -0.5), ("kl_coef", -0.1), ("max_seq_len", 0), ("lora_layer_rank", "grad"),
    ("lora_r", 0), ("num_workers", -1), ("cpus_per_worker", 0), ("lr", None), ("epochs", "3"),
])
def test_a_bad_value_names_its_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        make(**{field: value})


def test_replace_checks_too():
    from dataclasses import replace

    with pytest.raises(ValueError, match="TrainConfig.method"):
        replace(make(), method="none")


def test_defaults_and_every_task_type_are_valid():
    for task_type in TASK_TYPES:
        assert make(task_type=task_type).task_type == task_type
    for method in ("lora", "full", "last_layers"):
        make(method=method, zero_stage=3)


def test_grpo_settings_check_and_round_trip_as_a_dict():
    with pytest.raises(ValueError, match=r"TrainConfig\.grpo\.prompts_per_step"):
        make(grpo=GrpoSettings(prompts_per_step=0))
    cfg = make(task_type="GrpoTask", grpo={"prompts_per_step": 4, "beta": 0.0})
    assert isinstance(cfg.grpo, GrpoSettings) and cfg.grpo.prompts_per_step == 4
    assert TrainConfig(**cfg.to_dict()) == cfg  # what a Ray worker rebuilds from train_loop_config


def test_flags_once_in_extra_become_fields():
    """Callers (and recorded configs) that still pass the old `extra` keys keep working."""
    cfg = make(extra={"n_params": 123, "compile": False, "search_trial": True, "cpu_threads": 1,
                      "prompts_per_step": 4, "sandbox": {"call_timeout_s": 5.0}, "plan": {"gpus": 1}})
    assert (cfg.n_params, cfg.compile, cfg.search_trial, cfg.cpu_threads) == (123, False, True, 1)
    assert cfg.grpo.prompts_per_step == 4 and cfg.grpo.sandbox == {"call_timeout_s": 5.0}
    assert cfg.extra == {"plan": {"gpus": 1}}  # free-form records stay
    with pytest.raises(ValueError, match="TrainConfig.n_params"):
        make(extra={"n_params": -1})
