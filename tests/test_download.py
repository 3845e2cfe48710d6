"""Checkpoint downloads: resume from a partial file, md5 check, a clear error when offline, several processes
fetching one file at once."""

import hashlib
import multiprocessing
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from utils.download import DownloadError, download, published_urls

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class RangeHandler(BaseHTTPRequestHandler):
    requests_seen: list = []
    seconds_per_block = 0.0  # > 0: a slow server, sending 64 KiB blocks

    def do_GET(self):  # noqa: N802 (http.server's naming)
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
        type(self).requests_seen.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        for i in range(start, len(PAYLOAD), 1 << 16):
            self.wfile.write(PAYLOAD[i : i + (1 << 16)])
            time.sleep(self.seconds_per_block)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    RangeHandler.requests_seen, RangeHandler.seconds_per_block = [], 0.0
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


def download_when_all_are_ready(url: str, path: Path, md5_prefix: str, ready, results) -> None:
    ready.wait()
    try:
        download(url, path, md5_prefix=md5_prefix)
        results.put(hashlib.md5(path.read_bytes()).hexdigest())
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")


def test_processes_fetching_one_file_at_once_all_get_it_verified(server, tmp_path):
    """Three processes (the ranks of a job on one machine, or nodes on a shared file system) ask for the same
    file at the same moment: one downloads it, the others wait and verify it."""
    RangeHandler.seconds_per_block = 0.02  # 0.3 s per download: they overlap
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Barrier(3), ctx.Queue()
    args = (f"{server}/m.pt", tmp_path / "m.pt", md5[:7], ready, results)
    procs = [ctx.Process(target=download_when_all_are_ready, args=args) for _ in range(3)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join()
    assert got == [md5] * 3
    assert RangeHandler.requests_seen == [0]  # fetched once
