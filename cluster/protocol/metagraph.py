"""The validator allow-list (hotkey -> stake) that `blacklist_low_stake` checks.

Two sources, one interface (`nodes()`, `describe()`):
- `FileMetagraph`: a JSON list of {"hotkey", "stake"} (MINER_METAGRAPH_FILE), re-read when it
  changes. For tests, the simulator and operators who sync the chain themselves.
- `ChainMetagraph`: the bittensor SDK syncing NETUID on SUBTENSOR_NETWORK in a background thread
  every few minutes (G.O.D's miner syncs every 5). The last good sync is cached on disk and loaded
  at start, so a restarted miner does not refuse every validator until the first sync returns.

An empty allow-list refuses every validator (403). That is logged loudly (at most once a minute)
and shown by `miner status`, never silent.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

log = logging.getLogger("miner.metagraph")
SYNC_INTERVAL_S = 300.0
EMPTY_WARNING_EVERY_S = 60.0


class Metagraph(Protocol):
    def nodes(self) -> dict[str, float]: ...

    def describe(self) -> str: ...


def read_nodes_file(path: Path) -> dict[str, float]:
    """hotkey -> stake from a JSON list of {"hotkey", "stake"}; missing file: empty."""
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())
    return {str(r["hotkey"]): float(r.get("stake", 0.0)) for r in rows}


def write_nodes_file(path: Path, nodes: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"hotkey": k, "stake": v} for k, v in sorted(nodes.items())]))
    tmp.replace(path)  # atomic: a reader never sees half a file


class _EmptyWarning:
    """Says (rate-limited) that an empty allow-list is refusing every validator."""

    def __init__(self) -> None:
        self._last = 0.0

    def check(self, nodes: dict[str, float], source: str) -> None:
        if not nodes and time.time() - self._last > EMPTY_WARNING_EVERY_S:
            self._last = time.time()
            log.warning("metagraph from %s is EMPTY: every validator request is refused with 403", source)


class FileMetagraph:
    def __init__(self, path: Path):
        self.path = path
        self._mtime: float | None = None
        self._nodes: dict[str, float] = {}
        self._lock = threading.Lock()
        self._empty = _EmptyWarning()

    def nodes(self) -> dict[str, float]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        with self._lock:
            if mtime != self._mtime:
                try:
                    self._nodes = read_nodes_file(self.path) if mtime is not None else {}
                    self._mtime = mtime
                except (ValueError, KeyError, TypeError) as exc:  # half-written or malformed: keep the last good
                    log.error("metagraph file %s unreadable (%s); keeping %d known nodes", self.path, exc, len(self._nodes))
            nodes = self._nodes
        self._empty.check(nodes, f"file {self.path}")
        return nodes

    def describe(self) -> str:
        n = len(self.nodes())
        state = "EMPTY - every validator is refused" if n == 0 else f"{n} hotkeys"
        return f"file {self.path}: {state}"


def bittensor_fetch(network: str, netuid: int) -> dict[str, float]:
    """hotkey -> stake (TAO) from the chain with the bittensor SDK (an optional dependency)."""
    try:
        import bittensor
    except ImportError as exc:
        raise RuntimeError("syncing the metagraph from the chain needs the bittensor SDK "
                           "(pip install bittensor), or set MINER_METAGRAPH_FILE") from exc
    metagraph = bittensor.Subtensor(network=network).metagraph(netuid)
    # fiber sums a node's stake entries in TAO; the SDK exposes that per uid as `S` (total stake).
    return {str(hk): float(stake) for hk, stake in zip(metagraph.hotkeys, metagraph.S)}


class ChainMetagraph:
    """Background sync from the chain; `nodes()` never waits on the network."""

    def __init__(self, network: str, netuid: int, cache_file: Path,
                 fetch: Callable[[str, int], dict[str, float]] = bittensor_fetch,
                 interval_s: float = SYNC_INTERVAL_S):
        self.network, self.netuid, self.cache_file = network, netuid, cache_file
        self._fetch, self.interval_s = fetch, interval_s
        self._nodes = read_nodes_file(cache_file) if cache_file.exists() else {}
        self.last_sync: float | None = None
        self.last_error: str | None = None
        self._empty = _EmptyWarning()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metagraph-sync", daemon=True)
        self._thread.start()

    def sync_once(self) -> None:
        try:
            nodes = self._fetch(self.network, self.netuid)
        except Exception as exc:  # keep serving the last good list; say why it is stale
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("metagraph sync of netuid %s on %s failed: %s", self.netuid, self.network, self.last_error)
            return
        if nodes:
            write_nodes_file(self.cache_file, nodes)  # cache first: a crash right after still restarts warm
            self._nodes, self.last_sync, self.last_error = nodes, time.time(), None
        else:
            self.last_error = "chain returned no nodes"

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sync_once()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()

    def nodes(self) -> dict[str, float]:
        nodes = self._nodes
        self._empty.check(nodes, f"netuid {self.netuid} on {self.network}")
        return nodes

    def describe(self) -> str:
        n = len(self._nodes)
        synced = "never synced" if self.last_sync is None else f"synced {time.time() - self.last_sync:.0f} s ago"
        err = f"; last error: {self.last_error}" if self.last_error else ""
        state = "EMPTY - every validator is refused" if n == 0 else f"{n} hotkeys"
        return f"chain netuid {self.netuid} on {self.network}: {state}, {synced}{err}"


def metagraph_from_settings(settings) -> Metagraph:
    """The file when MINER_METAGRAPH_FILE is set, else the chain."""
    if settings.metagraph_file is not None:
        return FileMetagraph(settings.metagraph_file)
    return ChainMetagraph(settings.subtensor_network, settings.netuid, settings.state_dir / "metagraph-cache.json")


def status_line(settings) -> str:
    """For `miner status` (another process): what the allow-list holds, without syncing."""
    if settings.metagraph_file is not None:
        return FileMetagraph(settings.metagraph_file).describe()
    cache = settings.state_dir / "metagraph-cache.json"
    nodes = read_nodes_file(cache) if cache.exists() else {}
    if not nodes:
        return f"chain netuid {settings.netuid} on {settings.subtensor_network}: EMPTY (never synced) - every validator is refused"
    age = time.time() - cache.stat().st_mtime
    return f"chain netuid {settings.netuid} on {settings.subtensor_network}: {len(nodes)} hotkeys, synced {age:.0f} s ago"


def chain_sync_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bittensor") is not None
