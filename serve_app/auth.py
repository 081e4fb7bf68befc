"""Request authentication exactly as fiber checks it, in G.O.D's order on every route:
`blacklist_low_stake` (403) first, then `verify_request` / `verify_get_request` (401), run as
ASGI middleware so it happens before FastAPI parses the body.

Also rejected (401): a `miner-hotkey` that is not ours. fiber's snapshot does not check it;
we do, so a request signed for another miner cannot be replayed against us.
"""
from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.datastructures import Headers

from cluster.protocol.metagraph import Metagraph, metagraph_from_settings
from cluster.protocol.signing import NonceManager, signing_message, verify_signature
from cluster.settings import Settings

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


# Readable without a signature: liveness and the API's own description.
PUBLIC_PATHS = {"/healthz", "/docs", "/openapi.json"}
MAX_BODY_BYTES = 1 << 20  # offers and training requests are a few hundred bytes


class SignedRequests:
    """ASGI middleware: authenticates every request before FastAPI parses anything.

    FastAPI parses a route's typed body before its dependencies run, so an auth dependency
    would let an unsigned caller learn our validation errors (and make us do that work).
    Here the raw body bytes are read once (capped), authenticated (403/401), checked to be
    JSON (422), and replayed to the app unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                return await _refuse(send, 413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            validator = authenticator().check(Headers(scope=scope), body)
        except HTTPException as exc:
            return await _refuse(send, exc.status_code, exc.detail)
        if scope["method"] == "POST":
            try:
                json.loads(body, parse_constant=_reject_constant)
            except ValueError as exc:  # UnicodeDecodeError included
                return await _refuse(send, 422, f"body is not strict UTF-8 JSON: {exc}")
        scope.setdefault("state", {})["validator_hotkey"] = validator
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # the client's later messages (e.g. disconnect)
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python accepts NaN/Infinity; the JSON standard does not


async def _refuse(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
