"""How a micro-batch's gradients become optimizer steps, and how a checkpoint is written.

Two engines behind one small interface (`module`, `backward`, `step`, `save`):
- `PlainEngine`: AdamW on one device, or DDP over the workers (Ray Train's prepare_model).
- `Zero3Engine`: DeepSpeed ZeRO-3 over the workers: parameters, gradients and optimizer state
  are sharded, so a model whose training state does not fit one device trains across the
  placement group (the planner's `lora_zero3` shape, or a full fine-tune too large for one GPU).
  The model is built already sharded (transformers' zero.Init path while `zero3_loading` is
  open) and saved consolidated: rank 0 writes an ordinary HF model or PEFT adapter that reloads
  without DeepSpeed, the way the validator loads it. ZeRO-3 checkpoints carry no optimizer
  state: a restarted worker group scatters the last checkpoint's weights back into its shards and
  goes on from that step with fresh optimizer moments.

`make_engine(cfg, module, model, params, device, world)` is the entry point; `zero3_loading(cfg,
device)` wraps loading the base model.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import replace
from pathlib import Path

import torch

from .config import TrainConfig
from .master_weights import adamw
from .modeling import save_trainable
from .paths import TRAIN_STATE

# ZeRO-3 knobs: buckets sized for 7-70B models (DeepSpeed's own defaults are for ~1B); small
# parameters (norms, biases) stay whole on every rank instead of being gathered per layer.
BUCKET = 50_000_000
PERSIST_THRESHOLD = 100_000
LIVE = 300_000_000


def zero3(cfg: TrainConfig) -> bool:
    if cfg.zero_stage not in (0, 3):
        raise ValueError(f"zero_stage must be 0 (no sharding) or 3 (ZeRO-3), not {cfg.zero_stage}")
    return cfg.zero_stage == 3


def zero3_supported(cfg: TrainConfig, recipe, log=print) -> TrainConfig:
    """The config a ZeRO-3 run can honour. The weight-averaging options, the keep-base guard, the
    dev pass and the per-layer rank probe copy or measure parameters, which are shards here: they
    are switched off (and said so) rather than silently operating on empty tensors; regional
    torch.compile is off (ZeRO-3's gather hooks break its graphs). A full fine-tune whose recipe precomputes from the base (DPO's
    reference log-probs) needs the whole model before sharding: such a job must use LoRA."""
    if not zero3(cfg):
        return cfg
    if recipe.prepare is not None and cfg.method == "full":
        raise ValueError(f"{cfg.task_type} full fine-tuning under ZeRO-3 is not supported: use method='lora'")
    off = [name for name in ("ema", "soup", "rollback", "keep_base", "dev_pass", "lora_layer_rank")
           if getattr(cfg, name)]
    if off:
        log(f"[train] ZeRO-3: {', '.join(off)} off (they copy or measure whole parameters; these are shards)")
    return replace(cfg, **{name: type(getattr(cfg, name))() for name in off}, compile=False)


def ds_config(cfg: TrainConfig, device: torch.device) -> dict:
    """The DeepSpeed config of a ZeRO-3 run. Our loop forms batches (token-budgeted), sets the
    LR and decides when to step; DeepSpeed shards, clips and casts. Its batch-size fields are
    bookkeeping only, and accumulation happens in ZeRO-3's gradient partitions between steps."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": device.type == "cuda"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": device.type == "cuda",
            "contiguous_gradients": True,
            "reduce_bucket_size": BUCKET,
            "stage3_prefetch_bucket_size": BUCKET,
            "stage3_param_persistence_threshold": PERSIST_THRESHOLD,
            # at most this many gathered parameters live at once, and fp32 gradients are
            # materialised for the optimizer this many parameters at a time (default 1e9 each:
            # 2 + 4 GB of headroom a near-full GPU does not have)
            "stage3_max_live_parameters": LIVE,
            "stage3_max_reuse_distance": LIVE,
            "sub_group_size": LIVE,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "zero_allow_untested_optimizer": True,  # torch's fused AdamW: no DeepSpeed op to compile
        "steps_per_print": 1 << 30,
    }


@contextlib.contextmanager
def zero3_loading(cfg: TrainConfig, device: torch.device):
    """While open, transformers builds models already partitioned over the workers (each rank
    keeps 1/world of every weight), so the full model never sits on one device."""
    if not zero3(cfg):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    if device.type == "cpu":  # tests: plain gloo; DeepSpeed would JIT-compile a C++ shm op per run
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    keep = HfDeepSpeedConfig(ds_config(cfg, device))  # transformers holds only a weak reference
    try:
        yield
    finally:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del keep


def make_engine(cfg: TrainConfig, module, model, params: list, device: torch.device, world: int):
    """`module` is what the forward pass runs (the model or the fast path's loss module that
    holds it), `model` the HF/PEFT model that is saved, `params` the trainable parameters."""
    if zero3(cfg):
        return Zero3Engine(cfg, module, model, params, device)
    return PlainEngine(cfg, module, model, params, device, world)


class PlainState:
    """What a plain (unsharded) run checkpoints: publishable weights, plus the trainable weights
    and optimizer state a restart resumes from. Also GRPO's (TRL steps its optimizer there)."""

    def __init__(self, model, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def save(self, tokenizer, out_dir: str, state: dict, write: bool) -> None:
        if not write:
            return
        save_trainable(self.model, tokenizer, out_dir)
        trainable = ({k: v for k, v in self.model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
                     if hasattr(self.model, "peft_config") else self.model.state_dict())
        torch.save({**state, "model": trainable, "optimizer": self.optimizer.state_dict()},
                   os.path.join(out_dir, TRAIN_STATE))

    def resume(self, state: dict, ckpt_dir: str | None = None) -> bool:
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        return True


class _ScheduledLr:
    """An engine's learning rate: the recipe's schedule sets it before every step."""
    optimizer: torch.optim.Optimizer

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class PlainEngine(PlainState, _ScheduledLr):
    def __init__(self, cfg: TrainConfig, module, model, params: list, device, world: int):
        import ray.train.torch

        # bf16 weights of a full fine-tune lose most AdamW updates to rounding: their fp32 values step
        super().__init__(model, adamw(cfg, params, device))
        self.cfg, self.params = cfg, params
        self.module = ray.train.torch.prepare_model(module, move_to_device=False) if world > 1 else module

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> None:
        self._set_lr(lr)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Zero3Engine(_ScheduledLr):
    def __init__(self, cfg: TrainConfig, module, model, params: list, device):
        import deepspeed

        self.model = model
        if getattr(module, "model", None) is model:
            # the fast path's loss module reads the output head's weight directly (fused CE):
            # ZeRO-3 must gather it when the loss module runs, not only inside lm_head.forward
            head = _hf(model).get_output_embeddings().weight
            deepspeed.zero.register_external_parameter(module, head)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=adamw(cfg, params, device, master=False),  # DeepSpeed's own fp32 master
            config=ds_config(cfg, device))
        self.module = self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # reduce-scatters into this rank's gradient partition

    def step(self, lr: float) -> None:
        self._set_lr(lr)
        self.engine.step()  # clips over all partitions, steps, zeroes the gradients

    def save(self, tokenizer, out_dir: str, state: dict, write: bool) -> None:
        """Every rank gathers (collective); rank 0 writes a model that loads without DeepSpeed."""
        peft = hasattr(self.model, "peft_config")
        # one layer at a time onto rank 0's CPU; a LoRA run gathers only its adapter
        full = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=peft)
        if not write:
            return
        weights = {k[len(self._prefix):]: v for k, v in full.items() if k.startswith(self._prefix)}
        # PEFT keeps the adapter's keys of this dict; an HF model writes all of it as safetensors
        self.model.save_pretrained(out_dir, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        # a restart reads a full model's weights from the safetensors above; an adapter's (small) ride
        # here under the model's own parameter names, which PEFT's saved file renames
        torch.save({**state, **({"model": weights} if peft else {})}, os.path.join(out_dir, TRAIN_STATE))

    @property
    def _prefix(self) -> str:  # the HF/PEFT model's parameter names inside the module DeepSpeed wraps
        return "model." if self.engine.module is not self.model else ""

    def resume(self, state: dict, ckpt_dir: str | None = None) -> bool:
        """The checkpoint's weights scattered into this group's shards, one parameter at a time
        (rank 0 reads, every rank takes its partition), then copied into the optimizer's fp32
        master weights, which are what it steps from. The optimizer's moments start fresh: they are
        not checkpointed (that would be 12 bytes a parameter more per save). Returns False (start
        over from the base) when the checkpoint does not hold every trainable parameter."""
        import deepspeed
        import torch.distributed as dist

        saved = ({k: (lambda v=v: v) for k, v in state["model"].items()} if "model" in state
                 else _safetensors(ckpt_dir) if ckpt_dir else {})
        named = dict(self.engine.module.named_parameters())
        wanted = {self._prefix + k for k in saved}
        if not saved or any(p.requires_grad and n not in wanted for n, p in named.items()):
            return False
        lead = dist.get_rank() == 0
        for name in sorted(saved):  # the same order on every rank: each gather is a collective
            param = named.get(self._prefix + name)
            if param is None:  # a weight the module lists under a tied twin's name
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if lead:
                    param.data.copy_(saved[name]())
        self.optimizer.refresh_fp32_params()
        return True


def _safetensors(folder: str) -> dict:
    """name -> reader of one tensor, over the safetensors files of a saved full model."""
    from safetensors import safe_open

    readers = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        f = safe_open(str(path), framework="pt")
        readers.update({key: functools.partial(f.get_tensor, key) for key in f.keys()})
    return readers


def _hf(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model
