"""Per-layer choices of what trains (training-recipes.md §3.2, §3.3):
- `freeze_all_but_last`: full fine-tuning of the last N decoder layers (and the final norm),
  the rest frozen - a method between LoRA and full FT (`method="last_layers"`);
- `probe_rank_pattern`: an adaptive LoRA rank per layer from a measurement, the gradient norm of
  each layer's linear weights at the base weights over a few micro-batches (the direction the
  first LoRA updates follow), as a peft `rank_pattern` (`lora_layer_rank="probe"`).
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch

# A layer's rank stays within [base/4, 4 x base]: no layer is switched off or takes every rank.
RANK_SPREAD = 4.0


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, module list) of the model's decoder layers: the ModuleList with
    num_hidden_layers entries (model.layers in llama/qwen2/mistral, transformer.h in gpt2)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"no list of {n} decoder layers in {type(model).__name__}")


def freeze_all_but_last(model, n_layers: int):
    """Only the last `n_layers` decoder layers and the final norm stay trainable."""
    name, layers = decoder_layers(model)
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"last_layers={n_layers}: the model has {len(layers)} decoder layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - n_layers:]:
        layer.requires_grad_(True)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    for child_name, child in parent.named_children():  # the norm after the last layer (llama: model.norm)
        if "norm" in child_name or child_name in ("ln_f",):
            child.requires_grad_(True)
    return model


def _linear_names(layer: torch.nn.Module, targets) -> list[str]:
    """The layer's linear modules that LoRA targets ("all-linear" or a list of name tails)."""
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    if targets == "all-linear":
        return names
    wanted = [targets] if isinstance(targets, str) else list(targets)
    return [n for n in names if n.rpartition(".")[2] in wanted or any(re.fullmatch(w, n) for w in wanted)]


def layer_gradient_norms(model, batches: list, loss_of: Callable, targets="all-linear") -> list[float]:
    """The gradient norm (Frobenius, summed in square over the layer's LoRA-targeted linear
    weights, averaged over `batches`) of each decoder layer at the current weights. Each
    weight's gradient is read and freed as soon as it is accumulated, so the probe holds one
    weight's gradient at a time, not the model's."""
    _, layers = decoder_layers(model)
    energy = [0.0] * len(layers)
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    hooks = []

    def reader(i: int):
        def hook(p):
            energy[i] += float(p.grad.float().pow(2).sum())
            p.grad = None
        return hook

    try:
        for i, layer in enumerate(layers):
            for name in _linear_names(layer, targets):
                w = layer.get_submodule(name).weight
                w.requires_grad_(True)
                hooks.append(w.register_post_accumulate_grad_hook(reader(i)))
        for batch in batches:
            loss_of(batch).backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return [math.sqrt(e / max(1, len(batches))) for e in energy]


def ranks_from_norms(norms: list[float], base_rank: int) -> list[int]:
    """Ranks in proportion to the layers' gradient norms, with the mean rank `base_rank` (the
    same adapter size as a uniform one), each within [base/RANK_SPREAD, base x RANK_SPREAD]."""
    total = sum(norms)
    if not norms or not math.isfinite(total) or total <= 0:
        return [base_rank] * len(norms)
    lo, hi = max(1, round(base_rank / RANK_SPREAD)), round(base_rank * RANK_SPREAD)
    return [min(hi, max(lo, round(base_rank * len(norms) * n / total))) for n in norms]


def rank_pattern(model, ranks: list[int], mlp_rank_ratio: float = 1.0) -> dict[str, int]:
    """peft rank_pattern keys (regexes on module-name tails) for per-layer ranks; with
    `mlp_rank_ratio` != 1 the layer's MLP projections get that multiple of its rank."""
    name, _ = decoder_layers(model)
    tail = re.escape(name.rpartition(".")[2])
    pattern: dict[str, int] = {}
    for i, r in enumerate(ranks):
        if mlp_rank_ratio == 1.0:
            pattern[rf"{tail}\.{i}\..*"] = r
        else:  # disjoint keys: peft saves them sorted, and the first match wins when it loads them
            pattern[rf"{tail}\.{i}\.mlp\..*"] = max(1, round(r * mlp_rank_ratio))
            pattern[rf"{tail}\.{i}\.(?!mlp\.).*"] = r
    return pattern


def probe_rank_pattern(model, batches: list, loss_of: Callable, cfg) -> tuple[dict[str, int], list[float], list[int]]:
    """(peft rank_pattern, per-layer gradient norms, per-layer ranks) for `cfg.lora_layer_rank == "probe"`."""
    norms = layer_gradient_norms(model, batches, loss_of, cfg.lora_targets)
    ranks = ranks_from_norms(norms, cfg.lora_r)
    ratio = cfg.lora_mlp_r / cfg.lora_r if cfg.lora_mlp_r else 1.0
    return rank_pattern(model, ranks, ratio), norms, ranks


def probe_ranks(base, recipe, cfg, examples: list, pad_id: int, device) -> tuple[dict[str, int], dict]:
    """The rank pattern for `cfg.lora_layer_rank` measured on the recipe's metric over the first
    `cfg.probe_batches` micro-batches of `examples`, and what was measured (for the job record)."""
    from .batching import make_batches

    if cfg.lora_layer_rank != "probe":
        raise ValueError(f"lora_layer_rank={cfg.lora_layer_rank!r}: the policies are '' and 'probe'")
    if recipe.prepare is not None:  # DPO: the reference log-probs come from the adapter switched off
        raise ValueError("lora_layer_rank='probe' measures the SFT loss at the base weights; not for this task type")
    base.to(device)
    batches = make_batches(examples, cfg.batch_tokens, cfg.max_batch, cfg.seed)[:max(1, cfg.probe_batches)]
    pattern, norms, ranks = probe_rank_pattern(base, batches, lambda b: recipe.per_sample(base, b, pad_id, device).mean(), cfg)
    return pattern, {"grad_norms": [round(n, 6) for n in norms], "ranks": ranks}
