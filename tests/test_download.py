"""Checkpoint downloads: resume from a partial file, md5 check, a clear error when offline."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from utils.download import DownloadError, download, published_urls

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class RangeHandler(BaseHTTPRequestHandler):
    requests_seen: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
        type(self).requests_seen.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        self.wfile.write(PAYLOAD[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    RangeHandler.requests_seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_resumes_and_verifies(server, tmp_path):
    target = tmp_path / "m.pt"
    (tmp_path / "m.pt.part").write_bytes(PAYLOAD[:1000])  # an interrupted earlier attempt
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    download(f"{server}/m.pt", target, md5_prefix=md5[:7])
    assert target.read_bytes() == PAYLOAD
    assert RangeHandler.requests_seen == [1000]
    assert not (tmp_path / "m.pt.part").exists()
    download(f"{server}/m.pt", target)  # present: no request
    assert RangeHandler.requests_seen == [1000]


def test_download_rejects_wrong_md5(server, tmp_path):
    with pytest.raises(DownloadError, match="does not match md5"):
        download(f"{server}/m.pt", tmp_path / "m.pt", md5_prefix="0000000")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.pt.part").exists()


def test_offline_error_names_url_and_path(tmp_path):
    url = "http://127.0.0.1:9/24-01-04T16-39-21.pt"  # the discard port: nothing listens
    with pytest.raises(DownloadError, match=f"{url} to {tmp_path}.*place it at"):
        download(url, tmp_path / "x.pt", timeout=2)


def test_published_urls():
    urls = published_urls("24-01-04T16-39-21")
    assert urls["ckpt"].endswith("/24-01-04T16-39-21/24-01-04T16-39-21.pt")
    assert urls["cfg"].endswith("/24-01-04T16-39-21/cfg-24-01-04T16-39-21.yaml")
    assert published_urls("23-12-22T16-13-38")["ckpt"].endswith("/checkpoints/epoch_best.pt")
    with pytest.raises(DownloadError, match="Unknown"):
        published_urls("00-00-00T00-00-00")
