"""The fast training step: padding-free packing, varlen attention, fused cross-entropy.

On CUDA a micro-batch is one row of concatenated examples (no padding): position ids restart
at every example and attention is confined to each example by `cu_seqlens` (PyTorch's
flash-attention varlen kernel, plugged into transformers' attention interface). On CPU the
same loss runs on the padded layout (varlen attention there is a slow reference, used by tests).
Either way the loss is the validator's metric: the mean over the micro-batch's samples of
each sample's mean label-token cross-entropy, computed by `fused_loss` on label tokens only.

`fast_path(model, cfg, device, longest)` is the one entry point the recipes use.
"""
from __future__ import annotations

import inspect
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batching import collate, make_batches
from .fused_loss import linear_cross_entropy, linear_kl
from .instruct_format import IGNORE, Example
from .master_weights import MASTER_BYTES, needs_master, transient_bytes, uses_master

ATTN = "packed_varlen"
_VARLEN: dict = {}  # the CUDA kernel and the keyword style of this torch version, set once


# ---------------------------------------------------------------- attention
def _varlen_cuda(q, k, v, cu, max_len: int, scale):
    fn, style = _VARLEN["fn"], _VARLEN["style"]
    kw = {"scale": scale, **({"window_size": (-1, 0)} if style["window"] else {"is_causal": True})}
    if k.shape[1] != q.shape[1]:
        if style["gqa"]:
            kw["enable_gqa"] = True
        else:  # older torch: expand the shared KV heads
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def _varlen_reference(q, k, v, cu, scale):
    """Causal attention inside each [cu[i], cu[i+1]) segment, one SDPA call per segment."""
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=True).transpose(0, 1))
    return torch.cat(out)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for one packed row: (1, H, T, D) -> (1, T, H, D)."""
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        raise RuntimeError("packed attention needs cu_seq_lens_q/max_length_q (use collate_packed)")
    window = getattr(module, "sliding_window", None)
    if window and max_len > window:
        raise NotImplementedError(f"sliding window {window} < packed example length {max_len}")
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = _varlen_cuda(q, k, v, cu, max_len, scaling) if q.is_cuda else _varlen_reference(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def enable_packed_attention(hf_model) -> None:
    from transformers import AttentionInterface

    if not _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
            params = inspect.signature(varlen_attn).parameters
            _VARLEN.update(fn=varlen_attn, style={"window": "window_size" in params, "gqa": "enable_gqa" in params})
        except ImportError:
            _VARLEN.update(fn=None, style={})
    AttentionInterface.register(ATTN, packed_attention)
    hf_model.set_attn_implementation(ATTN)


# ---------------------------------------------------------------- batches
def pack_batches(examples: list[Example], capacity: int, seed: int, max_count: int = 0) -> list[list[Example]]:
    """Examples in a seeded random order, cut into packs of at most `capacity` tokens (next-fit:
    a pack closes when the next example does not fit; an example longer than capacity is alone)
    and, with `max_count`, of at most that many examples."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    packs, current, used = [], [], 0
    for i in order:
        n = len(examples[i])
        if current and (used + n > capacity or len(current) == max_count):
            packs.append(current)
            current, used = [], 0
        current.append(examples[i])
        used += n
    if current:
        packs.append(current)
    return packs


def _label_rows(batch: list[Example], offsets: list[int]):
    """Flat positions whose next token is a label, those labels, and weights 1/(labels in the
    sample * samples in the batch): sum(weights * CE) = mean over samples of per-sample mean CE.
    Then the positions the validator's KL term averages over: those whose own label is set (its
    mask is `labels != -100` on the unshifted logits: a token-weighted mean over the eval set)."""
    index, targets, weights, kl_index = [], [], [], []
    for ex, off in zip(batch, offsets):
        pos = [t for t in range(len(ex) - 1) if ex.labels[t + 1] != IGNORE]
        index += [off + t for t in pos]
        targets += [ex.labels[t + 1] for t in pos]
        weights += [1.0 / (max(1, len(pos)) * len(batch))] * len(pos)
        kl_index += [off + t for t in range(len(ex)) if ex.labels[t] != IGNORE]
    return {"label_index": torch.tensor(index, dtype=torch.long), "label_targets": torch.tensor(targets, dtype=torch.long),
            "label_weights": torch.tensor(weights, dtype=torch.float32), "kl_index": torch.tensor(kl_index, dtype=torch.long)}


def collate_packed(batch: list[Example], device: torch.device) -> dict[str, torch.Tensor]:
    lengths = [len(ex) for ex in batch]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    ids = torch.tensor([t for ex in batch for t in ex.input_ids], dtype=torch.long)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor(offsets, dtype=torch.int32)
    out = {"input_ids": ids, "position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
           **_label_rows(batch, offsets[:-1])}
    out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    out["max_length_q"] = out["max_length_k"] = max(lengths)
    return out


def collate_padded(batch: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    padded = collate(batch, pad_id, torch.device("cpu"))
    width = padded["input_ids"].shape[1]
    out = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
           **_label_rows(batch, [row * width for row in range(len(batch))])}
    return {k: v.to(device) for k, v in out.items()}


@dataclass
class StepPlan:
    """How micro-batches are cut and laid out; the same for training and dev evaluation."""
    packed: bool
    batch_tokens: int
    max_batch: int
    checkpointing: bool = False

    def batches(self, examples: list[Example], seed: int) -> list[list[Example]]:
        if self.packed:
            return pack_batches(examples, self.batch_tokens, seed)
        return make_batches(examples, self.batch_tokens, self.max_batch, seed)

    def collate(self, batch: list[Example], pad_id: int, device: torch.device) -> dict:
        return collate_packed(batch, device) if self.packed else collate_padded(batch, pad_id, device)


# ---------------------------------------------------------------- the loss module
def hf_model_of(model):
    """The transformers model inside a PEFT wrapper (LoRA layers are injected into it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CausalLMLoss(torch.nn.Module):
    """forward(**collated) -> the micro-batch loss. Runs the backbone, then the fused head+CE
    on label positions only: logits are never made for prompt tokens. Wrap this module (not
    the HF model) in DDP, so that gradients are synchronised.

    With `kl_coef` > 0 (a KL-weighted Instruct task) the loss is the validator's score: CE +
    kl_coef x the mean KL(model || base) over the label positions, the base's logits from the
    cheapest exact source: the same forward with the LoRA adapter switched off, or, for a full
    fine-tune, `reference` (a frozen copy of the starting weights)."""

    def __init__(self, model, kl_coef: float = 0.0, reference=None):
        super().__init__()
        self.model = model
        self.kl_coef = kl_coef
        self._reference = [reference]  # in a list: not a submodule (DDP must not sync it, saves must not hold it)

    def _hidden(self, input_ids, model=None, **layout):
        hf = hf_model_of(model if model is not None else self.model)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=input_ids.is_cuda):
            hidden = hf.base_model(input_ids=input_ids, use_cache=False, **layout).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]), hf.get_output_embeddings().weight

    @torch.no_grad()
    def _base_hidden(self, input_ids, **layout):
        reference = self._reference[0]
        if reference is not None:
            return self._hidden(input_ids, model=reference, **layout)
        with self.model.disable_adapter():  # a PEFT model: the base is the same weights without the adapter
            return self._hidden(input_ids, **layout)

    def _terms(self, input_ids, label_index, label_targets, label_weights, kl_index, **layout):
        hidden, head = self._hidden(input_ids, **layout)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=input_ids.is_cuda):
            ce, _ = linear_cross_entropy(hidden.index_select(0, label_index), head, label_targets, label_weights)
            if not self.kl_coef or kl_index.numel() == 0:
                return ce, ce * 0.0, 0
            base_hidden, base_head = self._base_hidden(input_ids, **layout)
            kl, _ = linear_kl(hidden.index_select(0, kl_index), head, base_hidden.index_select(0, kl_index),
                              base_head, torch.ones(kl_index.numel(), device=kl_index.device))
        return ce, kl, kl_index.numel()

    def forward(self, return_terms: bool = False, **collated):
        """The loss; with `return_terms`, (weighted CE sum, KL sum over the KL positions, their
        count), the pieces of the score. Both through forward: ZeRO-3 gathers the weights there."""
        ce, kl_sum, count = self._terms(**collated)
        if return_terms:
            return ce, kl_sum, count
        return ce + self.kl_coef * kl_sum / count if count else ce

    @torch.no_grad()
    def token_losses(self, input_ids, label_index, label_targets, label_weights, **layout) -> torch.Tensor:
        """Per label-token cross-entropy, in label order (for the packed-vs-padded checks)."""
        layout.pop("kl_index", None)
        hidden, head = self._hidden(input_ids, **layout)
        logits = (hidden.index_select(0, label_index) @ head.t().to(hidden.dtype)).float()
        return F.cross_entropy(logits, label_targets, reduction="none")


# ---------------------------------------------------------------- memory plan
@dataclass
class MemoryPlan:
    tokens: int
    checkpointing: bool
    note: str


def plan_memory(hf_model, device: torch.device, want_tokens: int, longest: int, master: bool = False) -> MemoryPlan:
    """Tokens per micro-batch from free GPU memory: what is still to come (gradients and two
    AdamW states per trainable parameter) plus activations per token of a transformer layer
    (norm inputs/outputs, q/k/v, attention output, MLP gate/up/act: ~(6d + 2kv + 4ff) values per
    layer, with 15% slack). Gradient checkpointing (one layer's activations plus each layer's
    input per token) only when the micro-batch would otherwise fall below min(want, 4096).
    `master`: the optimizer steps the fp32 values of the bf16 weights (trainers/master_weights.py)."""
    if device.type != "cuda":
        return MemoryPlan(want_tokens, False, "cpu: no plan")
    c = hf_model.config
    c = getattr(c, "text_config", None) or c
    d, layers = c.hidden_size, c.num_hidden_layers
    ff = getattr(c, "intermediate_size", None) or 4 * d
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    layer_bytes = (6 * d + 2 * kv * head_dim + 4 * ff) * 2 * 1.15
    trainable = [p for p in hf_model.parameters() if p.requires_grad]
    to_come = sum(_state_bytes(p, master) for p in trainable)
    if master and needs_master(trainable):
        to_come += transient_bytes(trainable)  # the eager step's fp32 temporaries of one slice
    head_chunk = 8192 * c.vocab_size * 2 * 3  # bf16 logits, grad and fp32 temporaries of one CE chunk
    free, _ = torch.cuda.mem_get_info(device)
    # what torch's allocator holds but does not use (a model built in fp32 and cast leaves gigabytes
    # cached) is free to this process too: the driver's count alone once planned an 8B LoRA run with
    # gradient checkpointing that peaked at 23 of 80 GiB (benchmarks/results/throughput.md)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = 0.9 * free - to_come - head_chunk
    plain = int(budget // (layers * layer_bytes))
    if plain >= min(want_tokens, max(longest, 4096)):
        return MemoryPlan(max(longest, min(want_tokens, plain)), False, f"fits {plain} tokens")
    ckpt = int(budget // (layers * d * 2 + layer_bytes))
    if ckpt < longest:
        raise MemoryError(f"an example of {longest} tokens does not fit in GPU memory even with "
                          f"gradient checkpointing ({ckpt} tokens); use LoRA or more GPUs")
    return MemoryPlan(max(longest, min(want_tokens, ckpt)), True, f"{plain} tokens without recompute")


def _state_bytes(p: torch.nn.Parameter, master: bool = False) -> float:
    """GPU bytes a trainable parameter still needs once training starts: its gradient and two
    AdamW states in its dtype (with `master`, a bf16 residual and fp32 moments besides the bf16
    weight it already has: MASTER_BYTES less those 2); a ZeRO-3 shard (DeepSpeed marks it with ds_numel; its bf16 share
    is already allocated) needs this rank's share of an fp32 master copy, two fp32 Adam states
    and a bf16 gradient partition (the fp32 gradients exist one sub-group at a time)."""
    if hasattr(p, "ds_numel"):
        import torch.distributed as dist

        return 14 * p.ds_numel / (dist.get_world_size() if dist.is_initialized() else 1)
    if master and needs_master([p]):
        return (MASTER_BYTES - p.element_size()) * p.numel()
    return 3 * p.numel() * p.element_size()


def supports_packing(hf_model) -> bool:
    c = hf_model.config
    return (getattr(hf_model, "_supports_attention_backend", False)
            and getattr(c, "final_logit_softcapping", None) is None
            and getattr(c, "logit_scale", None) in (None, 1.0)
            and getattr(hf_model.get_output_embeddings(), "bias", None) is None)


def fast_plan(model, cfg, device: torch.device, longest: int) -> StepPlan:
    """What every fast path shares: the micro-batch plan from free GPU memory, packed varlen
    attention and the regionally compiled decoder layers, set up on `model` (HF or PEFT).
    cfg.compile=False or cfg.packed=False switch parts off."""
    hf = hf_model_of(model)
    packed = device.type == "cuda" and cfg.packed and supports_packing(hf)
    trainable = [p for p in hf.parameters() if p.requires_grad]
    # ZeRO-3 keeps DeepSpeed's own fp32 master (trainers/engines.py), never MasterAdamW's
    master = cfg.zero_stage != 3 and uses_master(cfg.fp32_master, trainable, device)
    mem = plan_memory(hf, device, cfg.batch_tokens, longest, master=master)
    if packed:
        enable_packed_attention(hf)
    if mem.checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if packed and cfg.compile:
        for layer in getattr(hf.base_model, "layers", []):
            layer.compile(dynamic=True)  # regional: one graph shared by all layers, fuses norm/rope/act
    return StepPlan(packed, mem.tokens, cfg.max_batch, mem.checkpointing)


def fast_path(model, cfg, device: torch.device, longest: int, reference=None) -> tuple[CausalLMLoss, StepPlan]:
    """The SFT loss module and the micro-batch plan for `model` (HF or PEFT) on `device`;
    `reference`: the frozen base of a full fine-tune with a KL term."""
    return CausalLMLoss(model, cfg.kl_coef, reference), fast_plan(model, cfg, device, longest)
