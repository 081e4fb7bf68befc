"""A DPO full fine-tune shrunk toward its base (trainers/dpo_shrink.py): base + a x (tuned - base) for
the a whose dev pairs give the surest gain over the base, the trained weights when none is surer."""
import json
import math
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainers.config import TrainConfig
from trainers.dpo_shrink import ALPHAS, gain_lower_bound, interpolate_weights, shrink_toward_base
from trainers.launch import TrainOutcome
from trainers.modeling import load_submission
from trainers.seed_soup import DevJudge, fit_with_soup

DPO_DT = {"field_prompt": "prompt", "field_system": None, "field_chosen": "chosen", "field_rejected": "rejected",
          "prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}"}


def _cfg(tmp_path, model, demo_task, **options) -> TrainConfig:
    rows = [{"prompt": f"{r['instruct']} {r['input']}".strip(), "chosen": r["output"], "rejected": "I do not know."}
            for r in demo_task["train"][:120]]
    train_file = tmp_path / "pairs.json"
    train_file.write_text(json.dumps(rows))
    return TrainConfig(model_path=str(model), train_file=str(train_file), dataset_type=DPO_DT, task_type="DpoTask",
                       run_dir=str(tmp_path / "runs"), num_workers=0, method="full", batch_tokens=2048,
                       dev_fraction=0.1, run_name="dpo", dpo_shrink=True, **options)


def _perturbed(model_path, out, scale: float, seed: int = 0):
    """The base plus seeded noise: a 'fine-tune' whose margins are large and of random sign."""
    model = load_submission(model_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    return out


def _weights(folder) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_interpolation_is_base_plus_a_times_the_update_by_tensor_name(tmp_path):
    a, b = torch.randn(4, 3), torch.randn(5)
    (tmp_path / "base").mkdir()
    (tmp_path / "tuned").mkdir()
    save_file({"a": a}, str(tmp_path / "base" / "model-00001-of-00002.safetensors"))  # sharded otherwise
    save_file({"b": b}, str(tmp_path / "base" / "model-00002-of-00002.safetensors"))
    tuned = {"a": (a + 1).bfloat16(), "b": b * 3, "head": torch.ones(2)}  # "head": a tensor the base lacks
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"))
    (tmp_path / "tuned" / "config.json").write_text("{}")
    out = interpolate_weights(tmp_path / "base", tmp_path / "tuned", 0.25, tmp_path / "out")
    got = load_file(str(out / "model.safetensors"))
    assert (out / "config.json").exists() and set(got) == {"a", "b", "head"}
    assert got["a"].dtype == torch.bfloat16
    assert torch.allclose(got["a"].float(), (a + 0.25 * (tuned["a"].float() - a)).bfloat16().float())
    assert torch.allclose(got["b"], b * 1.5) and torch.equal(got["head"], torch.ones(2))
    save_file({"model.a": a, "model.b": b}, str(tmp_path / "base" / "model-00001-of-00002.safetensors"))
    (tmp_path / "base" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="do not match"):  # names of another convention: no line to move on
        interpolate_weights(tmp_path / "base", tmp_path / "tuned", 0.25, tmp_path / "out")


def test_a_fine_tune_worse_than_its_base_is_shrunk_and_the_shrunk_weights_go_out(tmp_path, tiny_models, demo_task):
    """Noise on the weights makes every dev margin large and of random sign: the mean gain over the
    base is negative and its spread wide, so each step toward the base is surer, and the smallest a
    goes out, as exactly base + a x (tuned - base)."""
    cfg = _cfg(tmp_path, tiny_models["llama"], demo_task, train_deadline=time.time() + 600)
    tuned = _perturbed(cfg.model_path, tmp_path / "model", scale=0.05)
    before = _weights(tuned)
    outcome = shrink_toward_base(cfg, TrainOutcome(tuned, {"steps": 0}, {"dev_loss": 1.0}))
    record = outcome.summary["shrink"]
    assert record["alphas"] == [1.0, *ALPHAS] and record["chosen"] == min(ALPHAS)
    assert record["dev_gain_lb"] == sorted(record["dev_gain_lb"])  # surer at every step toward the base
    assert record["dev"] == sorted(record["dev"], reverse=True)  # and better on the mean: allowed
    assert json.loads((tmp_path / "shrink.json").read_text()) == record
    assert outcome.checkpoint_metrics["weights"] == f"shrunk a={min(ALPHAS):g}"
    base, after, a = _weights_of(cfg.model_path), _weights(outcome.model_dir), min(ALPHAS)
    name = next(n for n in after if n.endswith("q_proj.weight"))
    expected = (base[name].float() + a * (before[name].float() - base[name].float())).to(after[name].dtype)
    assert torch.equal(after[name], expected)
    # the record's bound is the bound of the published weights' own dev losses
    assert record["dev_gain_lb"][-1] == pytest.approx(gain_lower_bound(DevJudge(cfg).losses(outcome.model_dir)),
                                                      abs=1e-6)
    assert not (tmp_path / "runs" / "dpo-shrink").exists()  # the candidates are cleaned away


def _weights_of(model_path) -> dict:
    return {k: v for k, v in load_submission(model_path).state_dict().items()}


def test_the_base_itself_is_never_shrunk_and_other_tasks_are_untouched(tmp_path, tiny_models, demo_task):
    cfg = _cfg(tmp_path, tiny_models["llama"], demo_task)
    model = load_submission(cfg.model_path)
    model.save_pretrained(tmp_path / "model")
    outcome = shrink_toward_base(cfg, TrainOutcome(tmp_path / "model", {}, {"dev_loss": math.log(2)}))
    assert outcome.summary["shrink"]["chosen"] == 1.0  # every candidate is the base: the tie keeps a = 1
    assert outcome.checkpoint_metrics == {"dev_loss": math.log(2)}
    sft = replace(cfg, task_type="InstructTextTask")
    same = TrainOutcome(tmp_path / "model", {}, {})
    assert shrink_toward_base(sft, same) is same and shrink_toward_base(replace(cfg, dpo_shrink=False), same) is same


def test_a_trained_dpo_run_goes_through_the_shrink_step(tmp_path, tiny_models, demo_task):
    """fit_with_soup (what the tournament and the jobs call) ends with the shrink step: the record is
    in the summary, and the published folder holds the chosen candidate's dev metric."""
    cfg = _cfg(tmp_path, tiny_models["llama"], demo_task, lr=1e-3, epochs=1, saves=1, base_margin_se=0.0,
               train_deadline=time.time() + 600)
    outcome = fit_with_soup(cfg, tmp_path / "model")
    record = outcome.summary["shrink"]
    assert record["chosen"] in (1.0, *ALPHAS) and len(record["dev"]) == 1 + len(ALPHAS)
    best = record["alphas"].index(record["chosen"])
    allowed = [k for k, dev in enumerate(record["dev"]) if dev <= record["dev"][0]]  # no worse a dev mean
    assert best in allowed and record["dev_gain_lb"][best] == max(record["dev_gain_lb"][k] for k in allowed)
    assert gain_lower_bound(DevJudge(cfg).losses(outcome.model_dir)) == pytest.approx(record["dev_gain_lb"][best],
                                                                                      abs=1e-5)
