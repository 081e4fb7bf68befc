"""Request authentication exactly as fiber checks it, in G.O.D's order on every route:
`blacklist_low_stake` (403) first, then `verify_request` / `verify_get_request` (401).

Also rejected (401): a `miner-hotkey` that is not ours. fiber's snapshot does not check it;
we do, so a request signed for another miner cannot be replayed against us.
"""
from __future__ import annotations

from fastapi import HTTPException, Request

from cluster.metagraph import Metagraph, metagraph_from_settings
from cluster.settings import Settings
from cluster.signing import NonceManager, signing_message, verify_signature

from .wiring import authenticator

HEADERS = ("validator-hotkey", "miner-hotkey", "nonce", "signature")


class Authenticator:
    def __init__(self, settings: Settings, miner_hotkey: str, metagraph: Metagraph | None = None):
        self.min_stake = settings.min_stake_threshold
        self.miner_hotkey = miner_hotkey
        self.metagraph = metagraph or metagraph_from_settings(settings)
        self.nonces = NonceManager()

    def check(self, headers, body: bytes) -> str:
        """The validator's hotkey when the request is genuine; raises HTTPException otherwise."""
        missing = [h for h in HEADERS if not headers.get(h)]
        if missing:
            raise HTTPException(401, f"missing auth header(s): {', '.join(missing)}")
        validator = headers["validator-hotkey"]
        nodes = self.metagraph.nodes()
        stake = nodes.get(validator)
        if stake is None:
            raise HTTPException(403, "Hotkey not found in metagraph" + ("" if nodes else " (our metagraph is empty)"))
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
