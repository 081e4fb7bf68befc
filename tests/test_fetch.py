import http.server
import json
import threading

import pytest

from cluster.jobs.fetch import InputError, download_dataset, resolve_model


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        status, body, declared = self.routes.get(self.path.split("?")[0], (404, b"", None))
        self.send_response(status)
        if declared != -1:  # -1: no Content-Length, the body runs until the connection closes
            self.send_header("Content-Length", str(declared if declared is not None else len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_good_dataset_downloads(server, tmp_path):
    _Handler.routes["/ok.json"] = (200, json.dumps([{"a": "b"}]).encode(), None)
    assert download_dataset(f"{server}/ok.json?X-Amz-Signature=s", tmp_path / "d.json", 10_000) == [{"a": "b"}]


@pytest.mark.parametrize("path,reply,cap,reason", [
    ("/missing.json", None, 10_000, "HTTP 404"),
    ("/declared-big.json", (200, b"[]", 10**12), 10_000, "over the 10000-byte cap"),
    ("/streamed-big.json", (200, b"[" + b'"x",' * 5000 + b'"x"]', -1), 10_000, "download aborted"),
    ("/notjson.json", (200, b"hello", None), 10_000, "not JSON"),
    ("/jsonl.json", (200, b'{"a": 1}\n{"a": 2}\n', None), 10_000, "JSON Lines"),
    ("/object.json", (200, b'{"a": 1}', None), 10_000, "expected an array"),
    ("/empty.json", (200, b"[]", None), 10_000, "empty array"),
    ("/latin1.json", (200, b'["caf\xe9"]', None), 10_000, "UTF-8"),
])
def test_bad_datasets_fail_with_a_readable_reason(server, tmp_path, path, reply, cap, reason):
    if reply:
        _Handler.routes[path] = reply
    with pytest.raises(InputError, match=reason):
        download_dataset(f"{server}{path}", tmp_path / "d.json", cap, timeout_s=5)


def test_model_resolution(tmp_path, tiny_models):
    assert resolve_model(str(tiny_models["gpt2"]), tmp_path) == tiny_models["gpt2"].resolve()
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        resolve_model(str(tmp_path / "noconfig"), tmp_path)
    with pytest.raises(InputError, match="cannot fetch base model"):  # HF_HUB_OFFLINE in tests
        resolve_model("nobody/does-not-exist", tmp_path)
