"""G.O.D's `model_hash` (validator/utils/hash_verification.py: calculate_model_hash).

Only weight and config files count; tokenizer files, README and `last-checkpoint/` do not.
Computed once, after upload, from the uploaded snapshot, and cached in the job store:
the validator's submission GET times out after 10 s.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

_FIXED = ("adapter_model.bin", "adapter_model.safetensors", "pytorch_model.bin",
          "pytorch_model.safetensors", "model.safetensors", "adapter_config.json", "config.json")
_GLOBS = ("model-*.safetensors", "pytorch_model-*.bin", "pytorch_model-*.safetensors",
          "checkpoint/last.safetensors", "checkpoint/last-*.safetensors",
          "checkpoint/checkpoint-*.safetensors", "last-*.safetensors",
          "diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
          "vae/diffusion_pytorch_model.safetensors", "text_encoder/pytorch_model.bin",
          "text_encoder_2/pytorch_model.bin")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def calculate_model_hash(folder: str | Path) -> str | None:
    """The outer sha256 over `relpath:sha256(file)` of every candidate file, in sorted order."""
    root = Path(folder)
    candidates = {name for name in _FIXED}
    for pattern in _GLOBS:
        candidates.update(str(p.relative_to(root)) for p in root.glob(pattern))
    outer = hashlib.sha256()
    hashed = 0
    for rel in sorted(candidates):
        path = root / rel
        if not path.is_file() or path.stat().st_size == 0:
            continue
        outer.update(f"{rel}:{_file_sha256(path)}".encode())
        hashed += 1
    return outer.hexdigest() if hashed else None


def is_valid_hash(value: str | None) -> bool:
    return bool(value) and len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())
