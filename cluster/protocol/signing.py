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
import heapq
import secrets
import string
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where keys are used: hosts that only train lack the chain SDK
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
    from substrateinterface import Keypair  # outside the try: a missing SDK is an error, not "invalid"

    try:
        return bool(Keypair(ss58_address=validator_hotkey).verify(data=message, signature=signature))
    except Exception:  # malformed ss58 address or signature hex: simply not valid
        return False


@dataclass
class NonceManager:
    """Single-use nonces inside a +-2 minute window (fiber `NonceManager`).

    A nonce is remembered until its own timestamp leaves the window (ts + window), not for a
    fixed time after it was seen: a nonce stamped 2 minutes ahead stays valid for 4 minutes and
    must stay un-replayable for as long. Expiry is a heap, so each request costs O(log n) and
    memory is bounded by (request rate x 4 minutes)."""

    window_ns: int = NONCE_WINDOW_NS
    _seen: set[str] = field(default_factory=set)
    _expiry: list[tuple[int, str]] = field(default_factory=list)
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
            while self._expiry and self._expiry[0][0] < now:
                self._seen.discard(heapq.heappop(self._expiry)[1])
            if nonce in self._seen:
                return "nonce already used"
            self._seen.add(nonce)
            heapq.heappush(self._expiry, (ts + self.window_ns, nonce))
        return None

    def __len__(self) -> int:
        return len(self._seen)
