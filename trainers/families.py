"""Which model families we can train and the validator can load: it loads with the Auto
classes and without trust_remote_code (protocol doc §7.2, §12.2), so a model whose config
needs custom code (an `auto_map`, or a `model_type` transformers does not know) fails for
every miner and is not worth accepting."""
from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def causal_lm_model_types() -> frozenset[str]:
    """The installed transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES keys, read from its source
    without importing it: importing transformers takes seconds, and an offer must be answered
    within 3 s."""
    spec = importlib.util.find_spec("transformers")
    text = (Path(spec.origin).parent / "models" / "auto" / "modeling_auto.py").read_text()
    block = text[text.index("\nMODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):]
    block = block[:block.index("\n)\n")]
    return frozenset(re.findall(r'\(\s*"([\w\-]+)"\s*,\s*"\w+"\s*\)', block))


def unsupported_reason(config: dict) -> str | None:
    """None when transformers loads this config.json natively, else why not."""
    if config.get("auto_map"):
        return "the model needs trust_remote_code (config.json has auto_map), which the validator does not pass"
    model_type = config.get("model_type")
    if model_type and model_type not in causal_lm_model_types():
        return f"model_type {model_type!r} is not a causal LM built into transformers (it would need trust_remote_code)"
    return None
