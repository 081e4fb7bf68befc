"""fp32 master weights for bf16 full fine-tunes (trainers/master_weights.py, PlainEngine).

A bf16 model trained at a full-FT learning rate loses most AdamW updates to rounding; with master
weights its bf16 weights follow an fp32 run of the same steps. Real engine, real tiny Llama (bf16 on
the CPU stands in for the GPU's bf16 weights)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.config import TrainConfig
from trainers.engines import PlainEngine
from trainers.master_weights import MasterAdamW, fits, needs_master, slices

LR, STEPS = 1e-5, 12


def _model(dtype):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


def _train(dtype, fp32_master: bool):
    """STEPS engine steps on one fixed batch; the weights (as fp32) before and after."""
    model = _model(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(model_path="", train_file="", dataset_type={}, method="full", lr=LR, fp32_master=fp32_master)
    engine = PlainEngine(cfg, model, model, params, torch.device("cpu"), world=1)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    before = [p.detach().float().clone() for p in params]
    for _ in range(STEPS):
        engine.backward(model(input_ids=ids, labels=ids).loss.float())
        engine.step(LR)
    return engine, before, [p.detach().float().clone() for p in params]


def test_bf16_adamw_loses_most_updates_and_master_weights_keep_them():
    _, start, ref = _train(torch.float32, fp32_master=True)  # fp32 weights: no master copies needed
    _, start16, plain = _train(torch.bfloat16, fp32_master=False)
    engine, _, master = _train(torch.bfloat16, fp32_master=True)
    assert isinstance(engine.optimizer, MasterAdamW)
    assert all(st["exp_avg"].dtype == torch.float32 for st in engine.optimizer.state.values())

    def moved(after, before):
        return sum(int((a != b).sum()) for a, b in zip(after, before)) / sum(a.numel() for a in after)

    def gap(after):  # distance to the fp32 run's weights, relative to how far that run moved
        return (sum(float((a - r).abs().sum()) for a, r in zip(after, ref))
                / sum(float((r - s).abs().sum()) for r, s in zip(ref, start)))

    assert moved(ref, start) > 0.8  # in fp32 nearly every weight moves (not the embeddings of unseen tokens)
    # measured: fp32 0.88 of the weights moved, bf16 0.14, bf16 with master weights 0.77 (some
    # weights' 12 steps add up to less than their bf16 spacing still)
    assert moved(plain, start16) < 0.3  # in bf16 most of the updates round away
    assert moved(master, start16) > 0.6
    # the master run's bf16 weights sit near the fp32 run (bf16 rounding of the start included);
    # the plain bf16 run is far off it (measured 0.28 vs 0.92 of the fp32 run's own movement)
    assert gap(master) < 0.5 * gap(plain)


def test_a_write_to_the_bf16_weights_is_taken_as_it_is():
    """Steps below the bf16 spacing add up in the residual; a rollback or resume writes the bf16
    weights from outside, and the next step starts there, not from a stale fp32 value."""
    w = torch.nn.Parameter(torch.full((64,), 0.02, dtype=torch.bfloat16))
    start = float(w[0].detach())  # 0.02 as bf16 holds it
    opt = MasterAdamW([w], lr=1e-6, weight_decay=0.0)
    for _ in range(3):  # AdamW's first steps move by lr each on a constant gradient
        w.grad = torch.ones_like(w)
        opt.step()
    value = float(w[0].detach()) + float(opt.state[w]["residual"][0])
    assert value == pytest.approx(start - 3e-6, abs=1e-8)  # kept in fp32 ...
    assert float(w[0].detach()) == start  # ... while each 1e-6 step is below the bf16 spacing (6e-5 here)
    with torch.no_grad():
        w.fill_(0.5)  # the rollback
    w.grad = torch.zeros_like(w)
    opt.step()
    assert float(w[0].detach()) == pytest.approx(0.5, abs=0.5 * 2**-8)


def _pair(shapes, seed=0):
    """fp32 parameters and bf16 ones at the same (bf16-representable) values."""
    torch.manual_seed(seed)
    ref = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    bf = [torch.nn.Parameter(r.detach().to(torch.bfloat16)) for r in ref]
    with torch.no_grad():
        for r, b in zip(ref, bf):
            r.copy_(b.float())
    return ref, bf


def _grads(params, step):
    for p in params:  # the same bf16 gradient for every run
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16).to(p.dtype)


def test_the_fp32_values_follow_fp32_adamw_across_slices(monkeypatch):
    """Weight + residual follows torch's fp32 AdamW on the same gradients (to within the residual's
    own bf16 precision, far below a bf16 spacing), also where a weight steps in several slices."""
    import trainers.master_weights as mw

    ref, bf = _pair([(300,), (40, 50), (7,)])
    calls, step_ = [], mw.master_step_
    monkeypatch.setattr(mw, "CHUNK_ELEMENTS", 400)  # the sliced path, as a large model's embedding takes it
    monkeypatch.setattr(mw, "master_step_", lambda w, *a: calls.append(w.numel()) or step_(w, *a))
    fp32 = torch.optim.AdamW(ref, lr=3e-5, weight_decay=0.01)
    ours = MasterAdamW(bf, lr=3e-5, weight_decay=0.01)
    assert slices(2000, 400) == [(0, 400), (400, 800), (800, 1200), (1200, 1600), (1600, 2000)]
    for step in range(20):
        _grads(ref, step)
        _grads(bf, step)
        fp32.step()
        ours.step()
    assert calls == [300, 400, 400, 400, 400, 400, 7] * 20
    for r, b in zip(ref, bf):
        value = b.detach().float() + ours.state[b]["residual"].float()
        # measured 9.5e-7 after 20 steps that moved the weights by up to 6e-4; a bf16 spacing at 0.02 is 1.2e-4
        assert (value - r.detach()).abs().max() < 3e-6
        assert (b.detach().float() - r.detach()).abs().max() > 1e-5  # the bf16 weights alone are a rounding off


def test_the_compiled_step_equals_the_eager_one():
    """The GPU's one-kernel step (torch.compile, here its CPU backend) computes what the eager step
    does, on weights of several sizes through one dynamic-shape compilation."""
    _, eager = _pair([(300,), (40, 50), (7,), (1,)], seed=1)
    _, compiled = _pair([(300,), (40, 50), (7,), (1,)], seed=1)
    opts = [MasterAdamW(eager, lr=1e-4, compile=False), MasterAdamW(compiled, lr=1e-4, compile=True)]
    for step in range(5):
        for params, opt in zip((eager, compiled), opts):
            _grads(params, step)
            opt.step()
    for e, c in zip(eager, compiled):
        se, sc = opts[0].state[e], opts[1].state[c]
        value_e, value_c = e.detach().float() + se["residual"].float(), c.detach().float() + sc["residual"].float()
        assert (value_e - value_c).abs().max() < 1e-6  # fp32 rounding order only
        assert torch.allclose(se["exp_avg_sq"], sc["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        assert int(sc["step"]) == 5


def test_used_only_for_half_precision_weights_that_fit():
    assert needs_master([torch.zeros(2, dtype=torch.bfloat16)]) and not needs_master([torch.zeros(2)])
    assert fits([torch.zeros(2, dtype=torch.bfloat16)], torch.device("cpu"))
    cfg = TrainConfig(model_path="", train_file="", dataset_type={}, method="full")
    model = _model(torch.float32)
    engine = PlainEngine(cfg, model, model, list(model.parameters()), torch.device("cpu"), world=1)
    assert not isinstance(engine.optimizer, MasterAdamW)  # fp32 weights step as they are


def test_the_memory_plan_counts_the_master_copies():
    """trainers/packing's plan reserves what the engine will allocate: 12 more bytes per bf16
    weight with master weights (14 in all, the weight's own 2 already there), 6 without."""
    from trainers.packing import _state_bytes

    bf16, fp32 = torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(1000))
    assert _state_bytes(bf16, master=True) == 12_000 and _state_bytes(bf16) == 6_000
    assert _state_bytes(fp32, master=True) == _state_bytes(fp32) == 12_000


def test_trl_steps_a_bf16_model_through_master_adamw(base_model, tmp_path):
    """GRPO hands TRL our optimizer (trainers/grpo.py): through TRL's Trainer and accelerate's
    optimizer wrapper, MasterAdamW still steps fp32 values and rounds them into the bf16 model."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().float().clone() for p in params]
    optimizer = MasterAdamW(params, lr=1e-5)
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4, max_steps=2,
                      max_completion_length=8, learning_rate=1e-5, use_cpu=True, bf16=False, report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True, beta=0.0)
    rows = [{"prompt": f"{a} plus {a} is"} for a in range(8)]
    reward = lambda completions, **_: [float(len(c)) for c in completions]  # noqa: E731 - any signal will do
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, optimizers=(optimizer, scheduler))
    trainer.train()
    assert trainer.state.global_step == 2
    state = [optimizer.state[p] for p in params if p in optimizer.state]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert any(not torch.equal(p.detach().float(), b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)


def test_checkpoints_hold_bf16_moments_and_resume_to_fp32():
    """MasterAdamW writes its moments as bf16 (half the bytes per save); loading them back gives
    fp32 moments again, and a closure (whose gradients would come too late) is refused."""
    w = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    opt = MasterAdamW([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = opt.state_dict()
    assert saved["state"][0]["exp_avg"].dtype == torch.bfloat16
    again = MasterAdamW([w], lr=1e-3)
    again.load_state_dict(saved)
    assert again.state[w]["exp_avg"].dtype == torch.float32 and "residual" not in saved["state"][0]
    w.grad = torch.randn_like(w)
    again.step()  # a resumed optimizer steps (its residual starts at zero)
    assert again.state[w]["step"].item() == 2
    with pytest.raises(ValueError, match="closure"):
        again.step(lambda: 0.0)


def test_a_compiler_failure_falls_back_to_the_eager_step(monkeypatch):
    """A compiled step that fails on its first call (no compiler on the host, a kernel error) leaves
    the run stepping eagerly, with a warning, and the slice it failed on still steps once."""
    import trainers.master_weights as mw

    _, eager = _pair([(64,)], seed=2)
    _, failing = _pair([(64,)], seed=2)

    def broken(*_):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(mw, "compiled_step", lambda: broken)
    opts = [MasterAdamW(eager, lr=1e-4, compile=False), MasterAdamW(failing, lr=1e-4, compile=True)]
    for params, opt in zip((eager, failing), opts):
        _grads(params, 0)
    opts[0].step()
    with pytest.warns(UserWarning, match="stepping eagerly"):
        opts[1].step()
    assert not opts[1].compiled
    assert torch.equal(eager[0].detach(), failing[0].detach())
    assert torch.equal(opts[0].state[eager[0]]["residual"], opts[1].state[failing[0]]["residual"])
