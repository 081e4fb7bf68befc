"""The Instruct recipe trains every family we build from configs (Ray Train local mode,
num_workers=0: the same train_loop_per_worker, in-process) and selects by dev loss."""
import json

import pytest

from trainers.config import TrainConfig
from trainers.evaluate import instruct_loss, load_submission
from trainers.launch import fit


@pytest.mark.parametrize("family,method", [("llama", "lora"), ("qwen2", "lora"), ("mistral", "full"), ("gpt2", "lora")])
def test_recipe_lowers_the_validator_metric(tmp_path, tiny_models, demo_task, family, method):
    model = tiny_models[family]
    rows = demo_task["train"][:200]
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(rows))
    cfg = TrainConfig(model_path=str(model), train_file=str(train_file), dataset_type=demo_task["dataset_type"],
                      run_dir=str(tmp_path / "runs"), run_name="t", num_workers=0, method=method,
                      lr=3e-3 if method == "lora" else 1e-3, epochs=2, saves=2, batch_tokens=4096)
    outcome = fit(cfg, tmp_path / "out")
    expected = "adapter_config.json" if method == "lora" else "config.json"
    assert (outcome.model_dir / expected).exists()
    history = outcome.summary["history"]
    assert history[-1]["step"] == outcome.summary["steps"] and len(history) >= 4
    held_out = demo_task["test"][:40]
    base = instruct_loss(load_submission(model), str(model), held_out, demo_task["dataset_type"])
    tuned = instruct_loss(load_submission(outcome.model_dir) if method == "full" else _adapter(outcome.model_dir, model),
                          str(model), held_out, demo_task["dataset_type"])
    assert tuned < base


def _adapter(adapter_dir, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter_dir))


def test_deadline_in_the_past_still_yields_a_checkpoint(tmp_path, tiny_models, demo_task):
    import time

    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(demo_task["train"][:100]))
    cfg = TrainConfig(model_path=str(tiny_models["qwen2"]), train_file=str(train_file),
                      dataset_type=demo_task["dataset_type"], run_dir=str(tmp_path / "runs"), run_name="late",
                      num_workers=0, epochs=5, train_deadline=time.time() - 1)
    outcome = fit(cfg, tmp_path / "out")
    assert outcome.summary["steps"] == 1  # stops after the first step, and saves it
    assert (outcome.model_dir / "adapter_model.safetensors").exists()
