"""Which hotkey this miner is: MINER_HOTKEY, else the bittensor wallet's hotkey file, else a
development key generated once and kept in the state directory (with a loud warning)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from cluster.settings import Settings

log = logging.getLogger("miner.identity")


def miner_hotkey(settings: Settings) -> str:
    if settings.miner_hotkey:
        return settings.miner_hotkey
    if settings.wallet_name and settings.hotkey_name:
        path = Path("~/.bittensor/wallets").expanduser() / settings.wallet_name / "hotkeys" / settings.hotkey_name
        if path.exists():
            return json.loads(path.read_text())["ss58Address"]
        raise FileNotFoundError(f"hotkey file {path} not found (WALLET_NAME/HOTKEY_NAME)")
    dev = settings.state_dir / "dev_hotkey.json"
    if not dev.exists():
        from substrateinterface import Keypair

        dev.parent.mkdir(parents=True, exist_ok=True)
        kp = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
        dev.write_text(json.dumps({"ss58Address": kp.ss58_address}))
        log.warning("no MINER_HOTKEY or wallet configured: using development hotkey %s", kp.ss58_address)
    return json.loads(dev.read_text())["ss58Address"]
