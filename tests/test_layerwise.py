"""Per-layer options and the final dev pass (trainers/layerwise.py, trainers/dev_pass.py):
full FT of the last layers trains exactly those; the rank probe measures each layer's gradient
norm as a plain backward does and turns it into per-layer LoRA ranks peft applies; the dev pass
trains on the dev rows at the reduced LR from the chosen weights, and its checkpoint is published."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainers.config import TrainConfig
from trainers.dev_pass import DevPass
from trainers.layerwise import layer_gradient_norms, probe_rank_pattern, ranks_from_norms
from trainers.modeling import wrap_for_training


def _cfg(model, train_file="-", **kw) -> TrainConfig:
    return TrainConfig(model_path=str(model), train_file=str(train_file), dataset_type={}, **kw)


def test_last_layers_trains_only_the_last_layers_and_the_final_norm(short_fit, tmp_path, tiny_models, demo_task):
    model = tiny_models["llama"]
    base = load_file(str(model / "model.safetensors"))
    out = short_fit(tmp_path, model, demo_task, "last1", saves=1, method="last_layers", last_layers=1,
                    dev_fraction=0.0)
    trained = load_file(str(out.model_dir / "model.safetensors"))
    n = AutoModelForCausalLM.from_pretrained(model).config.num_hidden_layers
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    last = f"model.layers.{n - 1}."
    assert changed and all(k.startswith(last) or k == "model.norm.weight" for k in changed)
    assert any(k.startswith(last + "mlp.") for k in changed) and "model.norm.weight" in changed
    with pytest.raises(ValueError, match="decoder layers"):
        wrap_for_training(AutoModelForCausalLM.from_pretrained(model), _cfg(model, method="last_layers", last_layers=n + 1))


def test_rank_probe_matches_a_plain_backward_and_sets_the_ranks(tmp_path, tiny_models):
    model_dir = tiny_models["llama"]
    torch.manual_seed(0)  # the fixture's weights are random per session: these are the same every time
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(model_dir).config)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_of = lambda b: model(input_ids=b, labels=b).loss  # noqa: E731
    with torch.no_grad():  # layers that differ clearly: the last layer's MLP output scaled up
        model.model.layers[-1].mlp.down_proj.weight.mul_(40.0)
    norms = layer_gradient_norms(model, [ids, ids], loss_of)
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    model.zero_grad()
    loss_of(ids).backward()  # the same numbers from a plain backward over every weight
    for i, layer in enumerate(model.model.layers):
        expected = sum(float(m.weight.grad.pow(2).sum()) for m in layer.modules() if isinstance(m, torch.nn.Linear)) ** 0.5
        assert norms[i] == pytest.approx(expected, rel=1e-4)
    model.zero_grad()
    assert ranks_from_norms([1.0, 1.0, 2.0, 4.0], 8) == [4, 4, 8, 16]
    assert ranks_from_norms([0.0, 0.0, 0.0, 100.0], 8) == [2, 2, 2, 32]   # clamped to [r/4, 4r]
    assert ranks_from_norms([float("nan"), 1.0], 8) == [8, 8]             # no measurement: uniform
    cfg = _cfg(model_dir, lora_r=4, lora_alpha=8, lora_mlp_r=8)
    pattern, _, _ = probe_rank_pattern(model, [ids], loss_of, cfg)
    ranks = ranks_from_norms(norms, 4)
    assert all(ranks[i] <= ranks[j] for i in range(len(norms)) for j in range(len(norms)) if norms[i] < norms[j])
    assert len(set(ranks)) > 1  # the measured layers differ, so do their ranks
    peft_model = wrap_for_training(model, cfg, pattern)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    for m in (peft_model, loaded):  # as trained, and as the validator loads the saved adapter
        for i, layer in enumerate(m.base_model.model.model.layers):
            assert layer.self_attn.q_proj.lora_A["default"].weight.shape[0] == ranks[i]
            assert layer.mlp.up_proj.lora_A["default"].weight.shape[0] == 2 * ranks[i]
            assert layer.self_attn.q_proj.scaling["default"] == pytest.approx(2.0)  # alpha/r kept per layer


def test_dev_pass_trains_the_dev_rows_at_the_low_lr_and_is_published(short_fit, tmp_path, tiny_models, demo_task):
    out = short_fit(tmp_path, tiny_models["llama"], demo_task, "pass", saves=1, dev_pass=True, dev_pass_lr_ratio=0.25,
               dev_fraction=0.2, lora_layer_rank="probe", probe_batches=2, keep_base=False)
    history = out.summary["history"]
    final, before = history[-1], history[-2]
    assert final["weights"] == "dev pass" and final["dev_pass_steps"] >= 1 and final["lr"] == pytest.approx(0.25 * 3e-3)
    assert final["dev_loss_before_pass"] == before["dev_loss"] and final["dev_loss"] < before["dev_loss"]
    assert out.checkpoint_metrics["step"] == final["step"] == before["step"] + final["dev_pass_steps"]
    late = DevPass(TrainConfig(model_path="-", train_file="-", dataset_type={}, dev_pass=True), [1, 2, 3],
                   lambda rows, seed: [rows[:2], rows[2:]])
    assert late.reserve_s(per_step=1.0, save_s=2.0) == pytest.approx(2 * 1.2 + 2.0)
    assert late.fits(now=100.0, deadline=105.0, per_step=1.0, save_s=2.0) and late.fits(100.0, 0.0, 1.0, 2.0)
    assert not late.fits(now=100.0, deadline=104.0, per_step=1.0, save_s=2.0)  # skipped: it would end late
    probe = out.summary["layer_rank_probe"]
    assert len(probe["ranks"]) == len(probe["grad_norms"]) and sum(probe["ranks"]) > 0
    config = json.loads((out.model_dir / "adapter_config.json").read_text())
    assert sorted(config["rank_pattern"].values()) == sorted(probe["ranks"])


def test_saves_within_the_evaluation_share():
    from trainers.deadline import saves_within

    assert saves_within(0.1, window_s=100.0, save_s=2.0, saves=8) == 5     # 10 s of evaluations: 5 of 2 s
    assert saves_within(0.1, window_s=100.0, save_s=50.0, saves=8) == 2    # never fewer than a mid-run and the last
    assert saves_within(0.1, window_s=100.0, save_s=50.0, saves=1) == 1    # nor more than asked
    assert saves_within(0.5, window_s=100.0, save_s=1.0, saves=8) == 8     # never more than asked
    assert saves_within(0.0, window_s=100.0, save_s=50.0, saves=8) == 8    # share 0: off
