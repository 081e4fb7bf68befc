"""What a replica's routes depend on, installed once by the Serve deployment.

Module state, not `app.state`: Serve ships a pickled copy of the FastAPI app to the replica,
while route functions resolve these globals by module."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import HTTPException

if TYPE_CHECKING:
    from cluster.control import ControlPlane

    from .auth import Authenticator


class _Installed:
    """The replica's control plane and authenticator."""
    control: "ControlPlane | None" = None
    auth: "Authenticator | None" = None


def install(control: ControlPlane, auth: Authenticator) -> None:
    _Installed.control, _Installed.auth = control, auth


async def control_plane() -> ControlPlane:  # async: FastAPI runs a sync dependency in a thread
    if _Installed.control is None:
        raise HTTPException(503, "miner is starting")
    return _Installed.control


def authenticator() -> Authenticator:
    if _Installed.auth is None:
        raise HTTPException(503, "miner is starting")
    return _Installed.auth
