"""Request authentication exactly as fiber checks it, in G.O.D's order on every route:
`blacklist_low_stake` (403) first, then `verify_request` / `verify_get_request` (401).

Also rejected (401): a `miner-hotkey` that is not ours. fiber's snapshot does not check it;
we do, so a request signed for another miner cannot be replayed against us.
"""
from __future__ import annotations

import threading
from pathlib import Path

from fastapi import HTTPException, Request

from cluster.settings import Settings, read_metagraph
from cluster.signing import NonceManager, signing_message, verify_signature

from .wiring import authenticator

HEADERS = ("validator-hotkey", "miner-hotkey", "nonce", "signature")


class Metagraph:
    """The validator allow-list (hotkey -> stake), re-read when its file changes."""

    def __init__(self, path: Path | None):
        self.path = path
        self._mtime: float | None = None
        self._nodes: dict[str, float] = {}
        self._lock = threading.Lock()

    def nodes(self) -> dict[str, float]:
        if self.path is None:
            return {}
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        with self._lock:
            if mtime != self._mtime:
                self._nodes, self._mtime = read_metagraph(self.path), mtime
            return self._nodes


class Authenticator:
    def __init__(self, settings: Settings, miner_hotkey: str):
        self.min_stake = settings.min_stake_threshold
        self.miner_hotkey = miner_hotkey
        self.metagraph = Metagraph(settings.metagraph_file)
        self.nonces = NonceManager()

    def check(self, headers, body: bytes) -> str:
        """The validator's hotkey when the request is genuine; raises HTTPException otherwise."""
        missing = [h for h in HEADERS if not headers.get(h)]
        if missing:
            raise HTTPException(401, f"missing auth header(s): {', '.join(missing)}")
        validator = headers["validator-hotkey"]
        stake = self.metagraph.nodes().get(validator)
        if stake is None:
            raise HTTPException(403, "Hotkey not found in metagraph")
        if stake < self.min_stake:
            raise HTTPException(403, f"Insufficient stake of {stake} ")
        if headers["miner-hotkey"] != self.miner_hotkey:
            raise HTTPException(401, "request is addressed to another miner hotkey")
        message = signing_message(headers["nonce"], headers["miner-hotkey"], body)
        if not verify_signature(validator, headers["signature"], message):
            raise HTTPException(401, "Oi, invalid signature, you're not who you said you were!")
        # The nonce is consumed only by a correctly signed request: forged requests cannot
        # burn a real validator's nonces.
        problem = self.nonces.check_and_consume(headers["nonce"])
        if problem:
            raise HTTPException(401, f"Oi, that nonce is not valid! ({problem})")
        return validator


async def verified_validator(request: Request) -> str:
    """FastAPI dependency: hashes the raw body bytes as received (never a re-serialisation)."""
    return authenticator().check(request.headers, await request.body())
