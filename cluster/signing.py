"""fiber-compatible request signing (sr25519) and nonce rules.

The validator (fiber `get_headers_with_nonce`) signs
    f"{nonce}:{miner_hotkey}:{sha256(body_bytes).hexdigest()}"
with its hotkey and sends `validator-hotkey`, `miner-hotkey`, `nonce`, `signature` headers.
GETs are signed the same way over an empty body. The miner must hash the raw bytes it
received, never a re-serialisation (httpx versions serialise JSON differently).
Keys and signatures use substrate-interface's `Keypair` (maintained sr25519 bindings).
"""
from __future__ import annotations

import hashlib
import secrets
import string
import threading
import time
from dataclasses import dataclass, field

from substrateinterface import Keypair

NONCE_WINDOW_NS = 120_000_000_000  # fiber: nonces are valid within +-2 minutes


def signing_message(nonce: str, miner_hotkey: str, body: bytes) -> str:
    return f"{nonce}:{miner_hotkey}:{hashlib.sha256(body).hexdigest()}"


def make_nonce(now_ns: int | None = None) -> str:
    """fiber's nonce: a nanosecond timestamp and 10 random alphanumerics."""
    alphabet = string.ascii_letters + string.digits
    rand = "".join(secrets.choice(alphabet) for _ in range(10))
    return f"{now_ns if now_ns is not None else time.time_ns()}_{rand}"


def signed_headers(keypair: Keypair, miner_hotkey: str, body: bytes, nonce: str | None = None) -> dict[str, str]:
    """Headers exactly as fiber's validator client builds them."""
    nonce = nonce or make_nonce()
    signature = "0x" + keypair.sign(signing_message(nonce, miner_hotkey, body)).hex()
    return {
        "validator-hotkey": keypair.ss58_address,
        "miner-hotkey": miner_hotkey,
        "nonce": nonce,
        "signature": signature,
    }


def verify_signature(validator_hotkey: str, signature: str, message: str) -> bool:
    try:
        return bool(Keypair(ss58_address=validator_hotkey).verify(data=message, signature=signature))
    except Exception:  # malformed ss58 address or signature hex: simply not valid
        return False


@dataclass
class NonceManager:
    """Single-use nonces inside a +-2 minute window (fiber `NonceManager`)."""

    window_ns: int = NONCE_WINDOW_NS
    _seen: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check_and_consume(self, nonce: str, now_ns: int | None = None) -> str | None:
        """Returns None when the nonce is fresh (and records it), else the reason it is not."""
        now = now_ns if now_ns is not None else time.time_ns()
        try:
            ts = int(nonce.split("_")[0])
        except ValueError:
            return "nonce has no timestamp"
        if ts > 10**20:
            return "nonce timestamp out of range"
        if now - ts > self.window_ns:
            return "nonce too old"
        if ts - now > self.window_ns:
            return "nonce from the future"
        with self._lock:
            for old, seen_at in list(self._seen.items()):
                if now - seen_at > self.window_ns:
                    del self._seen[old]
            if nonce in self._seen:
                return "nonce already used"
            self._seen[nonce] = now
        return None
