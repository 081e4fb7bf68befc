"""Every family we build from configs trains one step of every task type (Ray Train local
mode, num_workers=0: the real train_loop_per_worker, in-process), saves a model that reloads
through the evaluator, and that model scores better than the base on the rows it trained on.
Families that need trust_remote_code are declined at offer time."""
import json
import math

import pytest

from cluster.console.demo_model import FAMILIES, build_tiny_model, texts_from_task
from cluster.protocol.wire import MinerTaskOffer, TaskType
from cluster.settings import load_settings
from trainers.config import TrainConfig
from trainers.evaluate import evaluate_path
from trainers.launch import fit

CHAT_DT = {"chat_template": "chatml", "chat_column": "conversations", "chat_role_field": "from",
           "chat_content_field": "value", "chat_user_reference": "human", "chat_assistant_reference": "gpt"}
DPO_DT = {"field_prompt": "prompt", "field_system": None, "field_chosen": "chosen", "field_rejected": "rejected",
          "prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}"}
FULL_FT = {"opt", "gemma2"}  # the others train LoRA adapters


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def _task_rows(demo_task) -> dict:
    rows = demo_task["train"][:8]
    prompt = [f"{r['instruct']} {r['input']}".strip() for r in rows]
    return {
        "InstructTextTask": (rows, demo_task["dataset_type"]),
        "ChatTask": ([{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r["output"]}]}
                      for p, r in zip(prompt, rows)], CHAT_DT),
        "DpoTask": ([{"prompt": p, "chosen": r["output"], "rejected": rows[(i + 1) % len(rows)]["output"]}
                     for i, (p, r) in enumerate(zip(prompt, rows))], DPO_DT),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_saves_and_reloads_every_task_type(family, family_root, demo_task, tmp_path):
    model = build_tiny_model(family_root / family, texts_from_task(demo_task["path"]), family, vocab_size=512)
    method = "full" if family in FULL_FT else "lora"
    for task_type, (rows, dt) in _task_rows(demo_task).items():
        data = tmp_path / f"{task_type}.json"
        data.write_text(json.dumps(rows))
        cfg = TrainConfig(model_path=str(model), train_file=str(data), dataset_type=dt, task_type=task_type,
                          run_dir=str(tmp_path / "runs"), run_name=f"{family}-{task_type}", num_workers=0,
                          method=method, lr=1e-3, epochs=1, saves=1, lora_r=4, lora_alpha=8)
        outcome = fit(cfg, tmp_path / f"out-{task_type}")
        assert outcome.summary["steps"] == 1
        saved = "adapter_config.json" if method == "lora" else "config.json"
        assert (outcome.model_dir / saved).exists()
        base = evaluate_path(model, model, data, dt, task_type)
        tuned = evaluate_path(outcome.model_dir, model, data, dt, task_type)
        assert math.isfinite(tuned) and tuned < base, (task_type, base, tuned)
        if task_type == "DpoTask":
            assert base == pytest.approx(math.log(2), abs=1e-5)  # the base is its own reference


def test_models_needing_remote_code_are_declined_at_offer_time(tmp_path, tiny_models, idle_decide):
    settings = load_settings()
    config = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    cases = {"native": config, "auto_map": {**config, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}},
             "unknown_type": {**config, "model_type": "x_custom_lm"}}
    answers = {}
    for name, cfg in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        offer = MinerTaskOffer(model=str(d), hours_to_complete=2, task_id="t", task_type=TaskType.DPOTASK)
        answers[name] = idle_decide(offer.task_type, offer.model, offer.hours_to_complete, settings)
    assert answers["native"].accepted, answers["native"].message
    assert not answers["auto_map"].accepted and "trust_remote_code" in answers["auto_map"].message
    assert not answers["unknown_type"].accepted and "trust_remote_code" in answers["unknown_type"].message
