"""GRPO's static-cache decoding (trainers/decoding.py): the same tokens as the dynamic cache, one
cache length for the whole run, and TRL's generation really going through it. On the CPU generate
does not compile (transformers compiles only on accelerators), so these check the cache half of the
path; the CUDA-graph half is measured by benchmarks/throughput_grpo.py on a GPU."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from trainers.decoding import CACHE_ROUND, KEPT_CACHES, cache_length, can_compile_decode, compile_decode, first_decode
from trainers.modeling import load_tokenizer

PROMPTS = ["Q: What is 2 plus 2?\nA:", "Q: Name a colour that is not blue, not red and not green.\nA:", "Hi"]


def _static_cache_lengths(model) -> list[int]:
    """Records the length of every static cache `generate` makes on `model`."""
    seen, make = [], model._prepare_static_cache

    def spy(*args, **kwargs):
        cache = make(*args, **kwargs)
        seen.append(model._previous_max_cache_length)
        return cache
    model._prepare_static_cache = spy
    return seen


def _greedy(model, tokenizer, prompts, **kwargs):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        return model.generate(**enc, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                              pad_token_id=tokenizer.pad_token_id, **kwargs)


def test_static_cache_decodes_the_same_tokens_with_one_cache_length(base_model):
    tokenizer = load_tokenizer(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    dynamic = _greedy(model, tokenizer, PROMPTS)
    length = cache_length(tokenizer, PROMPTS, 12)
    longest = max(len(ids) for ids in tokenizer(PROMPTS)["input_ids"])
    assert length % CACHE_ROUND == 0 and longest + 12 <= length < longest + 12 + CACHE_ROUND
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    compile_decode(model, config, length)
    assert config.cache_implementation == "static" and config.disable_compile is False
    seen = _static_cache_lengths(model)
    # the short prompt alone, then all of them: both caches at the run's length, none regrown
    _greedy(model, tokenizer, PROMPTS[2:], generation_config=config)
    static = _greedy(model, tokenizer, PROMPTS, generation_config=config)
    assert seen == [length, length]
    assert torch.equal(static, dynamic)


def test_one_static_cache_serves_every_call_of_a_shape(base_model):
    """A new cache per call would be new static addresses for the CUDA graph (a re-recording per
    call): the same object comes back, reset, and still decodes what the dynamic cache does."""
    tokenizer = load_tokenizer(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    others = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time there was a"]
    want = [_greedy(model, tokenizer, p) for p in (PROMPTS, others, PROMPTS)]
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    compile_decode(model, config, cache_length(tokenizer, PROMPTS + others, 12))
    caches, prepare = [], model._prepare_static_cache
    model._prepare_static_cache = lambda *a, **k: caches.append(prepare(*a, **k)) or caches[-1]
    got = [_greedy(model, tokenizer, p, generation_config=config) for p in (PROMPTS, others, PROMPTS)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))  # a reused cache holds nothing of the last call
    assert len(caches) == 3 and caches[0] is caches[1] is caches[2]
    for rows in ([PROMPTS[0]], PROMPTS[:2], PROMPTS):  # other batch sizes: their own caches, the oldest freed
        _greedy(model, tokenizer, rows, generation_config=config)
    assert KEPT_CACHES == 2 and len(model._kept_static_caches) == 2
    assert caches[-1] is not caches[0]  # two other shapes came between: the first one's memory went


def test_trl_generation_goes_through_the_static_cache(tmp_path, base_model):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    assert not can_compile_decode(model, torch.device("cpu"))  # the recipe turns it on for CUDA only
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4,
                      max_completion_length=5, max_steps=1, use_cpu=True, report_to="none", save_strategy="no",
                      logging_steps=1, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [float(len(c)) for c in completions]],
                          args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS * 4]),
                          processing_class=tokenizer)
    length = cache_length(tokenizer, PROMPTS, 5)
    compile_decode(trainer.model, trainer.generation_config, length)
    seen = _static_cache_lengths(model)
    trainer.train()
    assert seen and set(seen) == {length}


def test_first_decode_runs_in_train_mode_and_a_failure_falls_back_to_the_dynamic_cache(base_model):
    tokenizer = load_tokenizer(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    compile_decode(model, config, cache_length(tokenizer, PROMPTS, 8))
    seen, modes, generate = _static_cache_lengths(model), [], model.generate
    model.generate = lambda *a, **k: (modes.append(model.training), generate(*a, **k))[1]
    model.eval()
    assert first_decode(model, tokenizer, PROMPTS, 5, config)  # 5 rows from 3 prompts, through the static cache
    assert seen and config.cache_implementation == "static" and config.max_new_tokens != 4  # the run's own config
    assert modes == [True] and not model.training  # traced in the trainer's mode, then the model's mode back

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no kernel for this")
    model._prepare_static_cache = broken
    with pytest.warns(UserWarning, match="compiled decode step failed .*no kernel"):
        assert not first_decode(model, tokenizer, PROMPTS, 4, config)
    assert config.cache_implementation is None and config.disable_compile is True
    assert _greedy(model, tokenizer, PROMPTS, generation_config=config).shape[1] > 12  # generates, dynamically
