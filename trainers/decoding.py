"""GRPO's generation under CUDA graphs: a static KV cache sized once, and transformers' own compiled
decode step.

TRL's GRPOTrainer generates with a dynamic cache and turns `generate`'s compile off
(`GenerationConfig(..., disable_compile=True)`). Every decode step then launches each layer's kernels
from Python: for a 0.5 B model at 32 sequences that launch overhead, not the GPU, sets the pace of the
256 decode steps that make up most of a GRPO step. With a static cache `generate` compiles its decode
step (`torch.compile(mode="reduce-overhead")`, transformers' default CompileConfig) and replays it as a
CUDA graph; the prefill stays eager. The graph holds the weights by address: the optimizer updates them
in place, so every step decodes with the current policy.

The cache is sized once, for the longest prompt of the run plus the completion, rounded up: a static
cache of a new length recompiles the decode step (transformers keeps the longest length seen, so a
longer prompt than counted costs one recompile, not a failure). Sampling is unchanged: the same
logits processors and the same sampler as the dynamic path.

One cache object serves every call (`keep_one_cache`). transformers makes a new StaticCache per
`generate`; its tensors are static inputs of the graph, held by address, so each new cache makes
inductor record the decode step's graph again (once per call) and keep the old recording as one
more child node to check on every later decode step: a cost that grows with the run's length.
transformers 4.x kept one cache per model (`self._cache`, reset per call) for this reason.
"""
from __future__ import annotations

import math
import warnings

import torch

CACHE_ROUND = 64  # cache lengths round up to this: a few tokens more of cache, no recompiles
KEPT_CACHES = 2   # cache shapes kept (e.g. training's and a dev pass's generation batch); older ones freed


def hf_model(model):
    """The transformers model whose `generate` runs (a PEFT model's base model, adapter layers inside)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_compile_decode(model, device: torch.device) -> bool:
    """A CUDA device and a model class transformers declares compilable with a static cache."""
    return device.type == "cuda" and bool(getattr(hf_model(model), "_can_compile_fullgraph", False))


def cache_length(tokenizer, prompts: list[str], max_new_tokens: int) -> int:
    """Cache positions for the longest prompt (as tokenised with special tokens) plus the completion."""
    longest = max((len(ids) for ids in tokenizer(prompts)["input_ids"]), default=0)
    return CACHE_ROUND * math.ceil((longest + max_new_tokens) / CACHE_ROUND)


def compile_decode(model, generation_config, length: int) -> None:
    """Make `generate` with `generation_config` decode from a static cache of `length` positions
    (or longer) under CUDA graphs. Call it once, before the first generation."""
    generation_config.cache_implementation = "static"
    generation_config.disable_compile = False
    generation_config.max_cache_len = length  # the public knob where transformers has it (5.17 on)
    hf = hf_model(model)
    # transformers sizes a static cache at max(this call's need, the longest so far): set the run's
    # longest now, so that the first batch's cache is already the one every later batch reuses
    hf._previous_max_cache_length = max(length, getattr(hf, "_previous_max_cache_length", 0))
    keep_one_cache(hf)


def keep_one_cache(hf) -> dict:
    """Makes `hf.generate` reuse its static cache (reset: zeroed, length 0) while the batch size
    and length stay the same, instead of allocating a new one per call (see the module docstring).
    The kept caches by (implementation, batch, length), at most KEPT_CACHES of them."""
    kept = getattr(hf, "_kept_static_caches", None)
    if kept is not None:
        return kept
    make, kept = hf._prepare_static_cache, {}

    def prepare(cache_implementation, batch_size, max_cache_len, *args, **kwargs):
        key = (cache_implementation, batch_size, max(max_cache_len, getattr(hf, "_previous_max_cache_length", -1)))
        cache = kept.pop(key, None)
        if cache is None:
            while len(kept) >= KEPT_CACHES:
                kept.pop(next(iter(kept)))  # the least recently used
            cache = make(cache_implementation, batch_size, max_cache_len, *args, **kwargs)
        else:
            cache.reset()
        kept[key] = cache
        return cache
    hf._prepare_static_cache, hf._kept_static_caches = prepare, kept
    return kept


def first_decode(model, tokenizer, prompts: list[str], batch: int, generation_config) -> bool:
    """Compiles and records the decode step before training, as the trainer will call it: through
    the same model object, in train mode (the trainer generates inside its training step; the traced
    attention reads `self.training`, so an eval-mode graph would be traced again at the first step),
    on `batch` sequences (its generation batch: the graph is specialised on it) of the run's prompts.
    A compiler failure turns the static cache and the compile off again, with a warning, so that the
    run generates as TRL does instead of failing at its first step. Whether the compiled path stays on."""
    rows = (prompts * math.ceil(batch / max(1, len(prompts))))[:batch]
    enc = tokenizer(rows, return_tensors="pt", padding=True, padding_side="left").to(hf_model(model).device)
    config = generation_config.__class__.from_dict({**generation_config.to_dict(), "max_new_tokens": 4,
                                                    "min_new_tokens": 4})
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            model.generate(**enc, generation_config=config)
        return True
    except Exception as err:  # noqa: BLE001 - dynamo/inductor/triton/cudagraphs raise many kinds
        warnings.warn(f"GRPO generation: the compiled decode step failed ({type(err).__name__}: {err}); "
                      "generating with a dynamic cache, uncompiled")
        generation_config.cache_implementation, generation_config.disable_compile = None, True
        getattr(hf_model(model), "_kept_static_caches", {}).clear()  # no cache memory held for nothing
        return False
    finally:
        model.train(was_training)


def cudagraph_skips() -> int:
    """How often inductor ran a compiled graph without its CUDA graph (a run's summary reports it:
    a count that grows with the steps means the decode step lost its graphs)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])
