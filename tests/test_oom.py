"""The OOM ladder: an out-of-memory micro-batch is halved (same gradient), then a lone example
is cut to half its length; the training loop survives a simulated OOM."""
import json

import pytest
import torch

from trainers import instruct
from trainers.config import TrainConfig
from trainers.instruct_format import Example
from trainers.launch import fit
from trainers.oom import OomLadder


def _model_and_step(fail_calls: set[int]):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    calls = []

    def step(piece, weight):
        calls.append(len(piece))
        if len(calls) in fail_calls:
            raise torch.OutOfMemoryError("simulated")
        x = torch.tensor([[float(len(ex)), 1.0, -1.0] for ex in piece])
        loss = (model(x).squeeze(-1) ** 2).mean()
        (loss * weight).backward()
        return loss.item()

    return model, step, calls


def test_halving_the_micro_batch_keeps_the_loss_and_gradient():
    batch = [Example([1] * n, [1] * n) for n in (3, 5, 8, 13)]
    ref_model, ref_step, _ = _model_and_step(set())
    expected = ref_step(batch, 1.0)
    model, step, calls = _model_and_step({1})  # the first call runs out of memory
    ladder = OomLadder(instruct.cut_example, log=lambda *_: None)
    assert ladder.run(batch, step) == pytest.approx(expected)
    assert calls == [4, 2, 2] and ladder.max_examples == 2
    assert torch.allclose(model.weight.grad, ref_model.weight.grad)
    ladder.run(batch, step)  # later batches start at the size that fitted
    assert calls[3:] == [2, 2]


def test_a_single_example_that_does_not_fit_is_cut_then_gives_up():
    model, step, calls = _model_and_step({1})
    ladder = OomLadder(instruct.cut_example, min_len=4, log=lambda *_: None)
    ladder.run([Example(list(range(10)), list(range(10)))], step)
    assert ladder.max_len == 5 and calls == [1, 1]
    _, always_oom, _ = _model_and_step(set(range(1, 100)))
    with pytest.raises(torch.OutOfMemoryError):
        OomLadder(instruct.cut_example, min_len=4, log=lambda *_: None).run([Example([1] * 10, [1] * 10)], always_oom)
    with pytest.raises(torch.OutOfMemoryError):  # a recipe that cannot cut (DPO) propagates it
        OomLadder(None, log=lambda *_: None).run([Example([1] * 10, [1] * 10)], always_oom)


def test_with_several_workers_an_oom_propagates_instead_of_splitting_one_rank():
    # a split batch on one rank = more passes than its peers: their collectives would desync
    model, step, calls = _model_and_step({1})
    ladder = OomLadder(instruct.cut_example, log=lambda *_: None, solo=False)
    with pytest.raises(torch.OutOfMemoryError):
        ladder.run([Example([1] * n, [1] * n) for n in (3, 5)], step)
    assert calls == [2] and ladder.max_examples is None


def test_the_training_loop_survives_an_oom(tmp_path, monkeypatch, tiny_models, demo_task, capsys):
    calls = []

    def flaky(model, batch, pad_id, device):
        calls.append(len(batch))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return instruct.sft_per_sample(model, batch, pad_id, device)

    monkeypatch.setattr(instruct, "SFT", instruct.Recipe(per_sample=flaky, cut=instruct.cut_example))
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(demo_task["train"][:16]))
    cfg = TrainConfig(model_path=str(tiny_models["qwen2"]), train_file=str(train_file),
                      dataset_type=demo_task["dataset_type"], run_dir=str(tmp_path / "runs"), run_name="oom",
                      num_workers=0, epochs=2, saves=1)
    outcome = fit(cfg, tmp_path / "out")
    assert outcome.summary["steps"] == 2 and calls[:3] == [16, 8, 8] and calls[3] == 8
    assert "[oom] micro-batch of 16 does not fit" in capsys.readouterr().out
