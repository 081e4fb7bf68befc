"""Fault-injection fixtures: a hostile dataset server and a store/settings pair per test."""
import gzip
import http.server
import threading
import time

import pytest

from cluster.settings import load_settings


class Hostile(http.server.BaseHTTPRequestHandler):
    """Each path is a misbehaviour; `routes` maps a path to (behaviour, argument)."""
    routes: dict = {}
    hits: dict = {}
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path = self.path.split("?")[0]
        Hostile.hits[path] = Hostile.hits.get(path, 0) + 1
        kind, arg = self.routes.get(path, ("status", (404, b"<Error><Code>NoSuchKey</Code></Error>")))
        getattr(self, "_" + kind)(arg)

    def _send(self, status, body, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _status(self, arg):
        self._send(*arg)

    def _flaky(self, arg):  # fails `n` times with `status`, then serves `body`
        n, status, body = arg
        failing = Hostile.hits[self.path.split("?")[0]] <= n
        self._send(status if failing else 200, b"" if failing else body)

    def _hang(self, seconds):  # accepts the request and says nothing
        time.sleep(seconds)

    def _slow_loris(self, gap_s):  # a byte now and then, forever
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(10_000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(gap_s)
        except OSError:
            pass

    def _endless(self, declared):  # a body without end (a "3 GB file"), optionally declared
        self.send_response(200)
        if declared:
            self.send_header("Content-Length", str(declared))
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"[" + b'"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",' * 1500
        try:
            while True:
                self.wfile.write(chunk)
        except OSError:
            pass

    def _truncated(self, body):  # promises more than it sends, then hangs up
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) * 10))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _redirect_loop(self, _):
        self._send(302, b"", headers=(("Location", self.path),))

    def _gzip_bomb(self, size):
        body = gzip.compress(b"[" + b" " * size + b"]")
        self._send(200, body, headers=(("Content-Encoding", "gzip"),))

    def log_message(self, *a):
        pass


@pytest.fixture(scope="session")
def hostile():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def miner_env(tmp_path, monkeypatch):
    """Settings and a store in a fresh state dir (publishing to a local hub)."""
    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MINER_MODEL_LOOKUP", "off")
    for k in ("HUGGINGFACE_TOKEN", "HUGGINGFACE_USERNAME", "MINER_HUB_DIR"):
        monkeypatch.delenv(k, raising=False)
    from cluster.state.store import JobStore

    settings = load_settings()
    return settings, JobStore(settings.db_path)


@pytest.fixture(scope="session")
def pico(request):
    """A small pretrained model dir: the bench's pico-llama, else the suite's built base model."""
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2].parent / "shared" / "bench" / "models" / "pico-llama"
    return bench if (bench / "config.json").exists() else request.getfixturevalue("base_model")
