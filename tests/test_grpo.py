"""GRPO: the validator's metric (weights, extra_data convention, KL to the base), the recipe in
Ray Train local mode (TRL GRPOTrainer, sandboxed rewards, deadline, checkpoint), and the wiring
(/start_training_grpo/ refuses unusable reward functions; plan checks them on the rows)."""
import json
import time
import uuid
from dataclasses import replace

import pytest
import torch
from test_api_auth import _post, env  # noqa: F401 - the signed-API fixture

from cluster.jobs.reports import write_job_report
from trainers.config import GrpoSettings, TrainConfig
from trainers.grpo import check_grpo_task
from trainers.grpo_eval import evaluate_grpo_path, grpo_rows, grpo_score, prompt_kl
from trainers.instruct_format import DatasetError
from trainers.modeling import load_tokenizer
from trainers.reward_sandbox import RewardSandbox

ONE = "def always_one(completions, **kwargs):\n    return [1.0] * len(completions)\n"
HALF = "def always_half(completions, **kwargs):\n    return [0.5] * len(completions)\n"
EXTRA = ("def is_a(completions, extra_data=None, **kwargs):\n"
         "    return [1.0 if e == 'A' else 0.0 for e in extra_data]\n")
# Passes the validator's smoke test (prompts stand in for completions there) and fails in training.
FLAKY = ("def flaky(completions, **kwargs):\n    if any('?' not in c for c in completions):\n"
         "        raise RuntimeError('reward service down')\n    return [1.0] * len(completions)\n")
BROKEN = "def broken(completions:\n"
SHORT = "def short(completions, **kwargs):\n    return [1.0 / (1 + len(c)) for c in completions]\n"


def dataset_type(*funcs):
    return {"field_prompt": "question", "extra_column": "answer",
            "reward_functions": [{"reward_func": src, "reward_weight": w} for src, w in funcs]}


ROWS = [{"question": f"Q: What is {i} plus {i}?\nA:", "answer": "A" if i % 4 == 0 else "B"} for i in range(40)]


def test_rows_are_renamed_like_the_validator_does():
    rows = grpo_rows(ROWS[:2] + [{"question": "  ", "answer": "A"}], dataset_type())
    assert rows == [{"prompt": "Q: What is 0 plus 0?\nA:", "extra_data": "A"},
                    {"prompt": "Q: What is 1 plus 1?\nA:", "extra_data": "B"}]


def test_score_is_the_weighted_mean_reward_with_extra_data_per_completion(base_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    tokenizer = load_tokenizer(str(base_model))
    dt = dataset_type((ONE, 0.5), (HALF, 0.2), (EXTRA, 0.3))
    rows = grpo_rows(ROWS[:8], dt)
    with RewardSandbox([f["reward_func"] for f in dt["reward_functions"]], sample_rows=rows) as box:
        s = grpo_score(model, tokenizer, rows, box, [0.5, 0.2, 0.3], max_new_tokens=3)
    # 2 of 8 prompts have extra_data 'A'; each prompt's extra_data travels with both its completions.
    assert s.completions == 16
    assert s.per_function == {"always_one#0": 1.0, "always_half#1": 0.5, "is_a#2": 0.25}
    assert s.reward == pytest.approx(0.5 + 0.1 + 0.075) and s.kl == 0.0 and s.score == s.reward


def test_prompt_kl_is_zero_for_the_base_and_positive_once_the_adapter_moves(base_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(base_model))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear"))
    prompts = [r["question"] for r in ROWS[:3]]
    assert prompt_kl(model, model, tokenizer, prompts) == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert prompt_kl(model, model, tokenizer, prompts) > 1e-4


def _fit(tmp_path, base_model, dt, epochs=0.25, **overrides):
    from trainers.launch import fit

    train = tmp_path / "train.json"
    train.write_text(json.dumps(ROWS))
    grpo = GrpoSettings(prompts_per_step=4, max_completion_length=6, dev_prompts=4, dev_max_completion=6,
                        sandbox={"call_timeout_s": 5.0})
    cfg = TrainConfig(model_path=str(base_model), train_file=str(train), dataset_type=dt, task_type="GrpoTask",
                      run_dir=str(tmp_path / "runs"), run_name="g", num_workers=0, lr=1e-3, lora_r=4,
                      lora_alpha=8, epochs=epochs, saves=1, dev_fraction=0.2, grpo=grpo, cpu_threads=1, **overrides)
    return fit(cfg, tmp_path / "out")


def test_recipe_trains_publishes_and_reports_failing_rewards(tmp_path, base_model):
    dt = dataset_type((SHORT, 0.6), (EXTRA, 0.2), (FLAKY, 0.1), (BROKEN, 0.1))
    outcome = _fit(tmp_path, base_model, dt)
    s = outcome.summary
    assert s["steps"] == s["planned_steps"] == 2  # 32 train prompts x 0.25 epoch / 4 per step
    failures = s["reward_failures"]
    assert "does not parse" in failures["load_failures"]["broken#3"]
    assert failures["failed_samples"]["flaky#2"]["RuntimeError: reward service down (line 3)"] > 0
    assert (outcome.model_dir / "adapter_config.json").exists()
    history = s["history"]  # in the shape the job report plots (a crash there would fail the job)
    assert [h["step"] for h in history] == [1, 2] and all("loss" in h and "lr" in h for h in history)
    assert s["decode"] == {"compiled": False, "cudagraph_skips": 0}  # the CPU generates as TRL does
    assert history[-1]["dev_loss"] == pytest.approx(-history[-1]["dev_score"])
    write_job_report(tmp_path, s, {"train": 1.0}, selected=outcome.checkpoint_metrics)
    assert json.loads((tmp_path / "loss_curve.json").read_text()) == history
    assert outcome.checkpoint_metrics["dev_score"] == pytest.approx(-outcome.checkpoint_metrics["dev_loss"])
    test = tmp_path / "test.json"
    test.write_text(json.dumps(ROWS[:6]))
    score = evaluate_grpo_path(outcome.model_dir, str(base_model), test, dt, max_new_tokens=4)
    assert score.kl > 0 and score.score == pytest.approx(score.reward - 0.5 * score.kl)
    # what `miner simulate` and the benchmarks call: the same score, higher is better
    from trainers.evaluate import HIGHER_IS_BETTER, evaluate_path
    assert "GrpoTask" in HIGHER_IS_BETTER
    assert evaluate_path(outcome.model_dir, str(base_model), test, dt, "GrpoTask") == pytest.approx(
        evaluate_grpo_path(outcome.model_dir, str(base_model), test, dt).score)


def test_recipe_past_its_deadline_still_leaves_a_checkpoint(tmp_path, base_model):
    outcome = _fit(tmp_path, base_model, dataset_type((ONE, 1.0)), train_deadline=time.time() - 1)
    assert outcome.summary["steps"] == 1 and (outcome.model_dir / "adapter_model.safetensors").exists()


def test_plan_checks_reward_functions_on_the_downloaded_rows():
    picky = "def picky(completions, **kwargs):\n    return [len(c) / 0 for c in completions]\n"
    with pytest.raises(DatasetError, match="no usable reward function .picky: ZeroDivisionError"):
        check_grpo_task(ROWS, dataset_type((picky, 1.0)))
    with pytest.raises(DatasetError, match="non-empty prompt"):
        check_grpo_task([{"question": ""}], dataset_type((ONE, 1.0)))
    check_grpo_task(ROWS, dataset_type((picky, 1.0), (EXTRA, 1.0)))  # one usable function is enough


def _grpo_request(model, funcs):
    return {"model": model, "task_id": str(uuid.uuid4()), "hours_to_complete": 1, "expected_repo_name": "r",
            "dataset": "http://127.0.0.1:9/x.json", "file_format": "s3", "dataset_type": dataset_type(*funcs)}


def test_start_training_grpo_refuses_unusable_reward_functions(env):  # noqa: F811
    no_completions = "def r(texts, **kwargs):\n    return [1.0] * len(texts)\n"
    for funcs, why in [((BROKEN, 1.0),), "does not parse"], [((no_completions, 1.0),), "no `completions`"], \
                      [((ONE, 0.0),), "weight 0"], [(), "no reward functions"]:
        resp = _post(env, "/start_training_grpo/", _grpo_request(env["model"], funcs))
        assert resp.status_code == 422 and why in resp.json()["detail"], resp.text
    assert env["control"].store.list_jobs() == []
    request = _grpo_request(env["model"], [(BROKEN, 0.5), (EXTRA, 0.5)])
    resp = _post(env, "/start_training_grpo/", request)
    assert resp.status_code == 200, resp.text
    job = env["control"].store.get_job(request["task_id"])
    assert job.task_type == "GrpoTask" and job.dataset_type["extra_column"] == "answer"



@pytest.mark.parametrize("early", [True, False])
def test_early_save_checkpoints_right_after_the_probe_steps(early):
    """The tournament's early_save: GRPO reports a checkpoint at the probe's end, not only at the
    planned save points (the output folder then holds a model minutes into a long run)."""
    from types import SimpleNamespace

    from trainers.deadline import PROBE_STEPS
    from trainers.grpo import DeadlineAndCheckpoints, grpo_plan

    cfg = TrainConfig(model_path="", train_file="", dataset_type={}, early_save=early, saves=2)
    reported = []
    callback = DeadlineAndCheckpoints(cfg, grpo_plan(cfg, total=100), lambda: {"dev_score": 0.1},
                                      lambda step, total, entry: reported.append(step), rank=1)
    for step in range(1, PROBE_STEPS + 2):
        callback.on_step_end(None, SimpleNamespace(global_step=step), SimpleNamespace(should_training_stop=False))
    assert reported == ([PROBE_STEPS] if early else [])


def test_the_deadline_probe_times_training_steps_not_the_set_up_before_them(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import trainers.grpo as grpo
    now = [1000.0]
    monkeypatch.setattr(grpo.time, "time", lambda: now[0])
    cfg = TrainConfig(model_path="m", train_file="t", dataset_type={}, task_type="GrpoTask", run_dir=str(tmp_path),
                      train_deadline=1000.0 + 3600)
    plan = grpo.grpo_plan(cfg, 10_000)
    callback = grpo.DeadlineAndCheckpoints(cfg, plan, evaluate=lambda: {}, report=lambda *a: None, rank=0)
    now[0] += 46.0  # what happens between the callback's construction and the first step: the decode compile
    callback.on_train_begin(None, None, None)
    for step in range(1, grpo.PROBE_STEPS + 1):
        now[0] += 1.5
        callback.on_step_end(None, SimpleNamespace(global_step=step), SimpleNamespace(should_training_stop=False))
    assert plan.per_step == pytest.approx(1.5)
    assert plan.total == int((3600 - 46 - 7.5) / 1.5 * 0.9) + grpo.PROBE_STEPS  # the steps that fit, planned from the real step time


def test_generation_is_compiled_only_with_time_left_for_the_compile(monkeypatch):
    from types import SimpleNamespace

    import trainers.grpo as grpo
    calls = []
    monkeypatch.setattr(grpo, "can_compile_decode", lambda model, device: True)  # as on a GPU
    monkeypatch.setattr(grpo, "compile_decode", lambda *a: calls.append("compile"))
    monkeypatch.setattr(grpo, "first_decode", lambda *a: calls.append("probe") or True)
    trainer = SimpleNamespace(model=None, generation_config=None,
                              args=SimpleNamespace(per_device_train_batch_size=8, steps_per_generation=1))
    g = grpo.grpo_settings(TrainConfig(model_path="m", train_file="t", dataset_type={}), "cuda")
    tok = lambda prompts: {"input_ids": [[1, 2, 3] for _ in prompts]}  # noqa: E731
    assert not grpo.fast_generation(trainer, g, tok, ["p"], "cuda", deadline=time.time() + 60) and calls == []
    assert grpo.fast_generation(trainer, g, tok, ["p"], "cuda", deadline=time.time() + 3600)
    assert calls == ["compile", "probe"]
    assert not grpo.fast_generation(trainer, replace(g, compiled_decode=False), tok, ["p"], "cuda")
