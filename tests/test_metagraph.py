"""The validator allow-list: file and chain sources, the on-disk cache, loud emptiness; nonce memory."""
import logging
import time

from cluster.protocol.metagraph import ChainMetagraph, FileMetagraph, read_nodes_file, status_line
from cluster.protocol.signing import NONCE_WINDOW_NS, NonceManager, make_nonce
from cluster.settings import load_settings


def _wait_for(predicate, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end and not predicate():
        time.sleep(0.01)
    return predicate()


def test_chain_sync_caches_and_a_restart_serves_the_cache_while_the_chain_is_down(tmp_path):
    cache = tmp_path / "metagraph-cache.json"
    calls = []

    def chain(network, netuid):
        calls.append((network, netuid))
        return {"5Validator": 5000.0, "5Small": 3.0}

    first = ChainMetagraph("finney", 56, cache, fetch=chain, interval_s=3600)
    assert _wait_for(lambda: first.nodes() == {"5Validator": 5000.0, "5Small": 3.0})
    first.stop()
    assert calls == [("finney", 56)] and read_nodes_file(cache)["5Validator"] == 5000.0

    def down(network, netuid):
        raise ConnectionError("subtensor unreachable")

    second = ChainMetagraph("finney", 56, cache, fetch=down, interval_s=3600)
    assert second.nodes()["5Validator"] == 5000.0  # served from the cache at once
    assert _wait_for(lambda: second.last_error is not None)
    second.stop()
    assert "subtensor unreachable" in second.describe() and "2 hotkeys" in second.describe()


def test_an_empty_chain_answer_never_replaces_a_good_list(tmp_path):
    answers = iter([{"5V": 2000.0}, {}])
    graph = ChainMetagraph("test", 241, tmp_path / "c.json", fetch=lambda n, u: next(answers), interval_s=3600)
    assert _wait_for(lambda: graph.nodes() == {"5V": 2000.0})
    graph.sync_once()
    graph.stop()
    assert graph.nodes() == {"5V": 2000.0} and graph.last_error == "chain returned no nodes"


def test_empty_metagraph_is_said_in_logs_and_status(tmp_path, monkeypatch, caplog):
    path = tmp_path / "metagraph.json"
    with caplog.at_level(logging.WARNING, logger="miner.metagraph"):
        assert FileMetagraph(path).nodes() == {}
    assert any("EMPTY" in r.message for r in caplog.records)
    monkeypatch.setenv("MINER_METAGRAPH_FILE", str(path))
    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path / "state"))
    assert "EMPTY" in status_line(load_settings())
    monkeypatch.delenv("MINER_METAGRAPH_FILE")
    assert "EMPTY (never synced)" in status_line(load_settings())


def test_malformed_metagraph_file_keeps_the_last_good_list(tmp_path):
    path = tmp_path / "metagraph.json"
    path.write_text('[{"hotkey": "5V", "stake": 10}]')
    graph = FileMetagraph(path)
    assert graph.nodes() == {"5V": 10.0}
    path.write_text('[{"hotkey": ')
    assert graph.nodes() == {"5V": 10.0}


def test_future_nonce_cannot_be_replayed_while_it_is_still_in_its_window():
    nonces, now = NonceManager(), time.time_ns()
    nonce = make_nonce(now + 90 * 10**9)  # stamped 90 s ahead: valid until now + 210 s
    assert nonces.check_and_consume(nonce, now_ns=now) is None
    assert nonces.check_and_consume(nonce, now_ns=now + 150 * 10**9) == "nonce already used"
    assert nonces.check_and_consume(nonce, now_ns=now + 211 * 10**9) == "nonce too old"


def test_nonce_memory_is_bounded_by_the_window():
    nonces, now = NonceManager(), time.time_ns()
    for i in range(1000):
        assert nonces.check_and_consume(make_nonce(now + i), now_ns=now + i) is None
    assert len(nonces) == 1000
    later = now + NONCE_WINDOW_NS + 10**9 + 1000
    assert nonces.check_and_consume(make_nonce(later), now_ns=later) is None
    assert len(nonces) == 1
