"""Downloading the QuickDraw sketch-rnn files (`--data.categories`) and `zoo.data.download`, offline:
a local HTTP server on 127.0.0.1 serves small sketch-rnn .npz files that the tests write, honours
Range and If-Range, counts requests, and can cut a response short or change a file between requests."""
import hashlib
import http.server
import logging
import threading
import time
import urllib.parse

import numpy as np
import pytest

from tests.conftest import cli_args
from tests.test_errors import error_lines, run_main
from tests.test_sketch_rnn_data import sketches
from zoo.cli import error_line
from zoo.data.download import cache_dir, download
from zoo.data.sketches import SketchDataModule, read_npz, write_npz


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        name = urllib.parse.unquote(self.path.lstrip("/"))
        if name not in srv.files:
            self.send_error(404)
            return
        data, etag = srv.files[name], f'"{hashlib.md5(srv.files[name]).hexdigest()}"'
        start = 0
        wanted = self.headers.get("Range")
        if wanted and self.headers.get("If-Range", etag) == etag:  # If-Range: resume only the same file
            start = int(wanted.removeprefix("bytes=").removesuffix("-"))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", etag)
        self.end_headers()
        body = data[start:]
        if srv.cut_after is not None:  # announce the whole length, send part of it, hang up
            body, srv.cut_after = body[:srv.cut_after], None
        if srv.delay:
            srv.delay.wait(5)  # holds the response until the test lets it go
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A server of `files` {name: bytes} at `url`; `requests` lists (path, Range, If-Range)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # straight to 127.0.0.1
        monkeypatch.delenv(var, raising=False)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.cut_after, srv.delay = {}, [], None, None
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def npz_bytes(tmp_path, name, seed, n_train=6):
    data = {"train": sketches(n_train, seed), "valid": sketches(3, seed + 1), "test": sketches(2, seed + 2)}
    return write_npz(tmp_path / "made" / f"{name}.npz", data).read_bytes()


def test_categories_download_cache_and_train(server, tmp_path):
    server.files = {"cat.npz": npz_bytes(tmp_path, "cat", 1, 6), "bus.npz": npz_bytes(tmp_path, "bus", 10, 4)}
    cache = tmp_path / "cache"
    dm = SketchDataModule(categories="cat,bus", cache_dir=str(cache), base_url=server.url + "/", batch_size=2)
    dm.setup("fit")
    assert [r[0] for r in server.requests] == ["/cat.npz", "/bus.npz"]
    assert dm.class_names == ["cat", "bus"] and dm.info().classes == ["cat", "bus"]
    assert dm.sets["train"].labels == [0] * 6 + [1] * 4 and dm.sets["test"].labels == [0] * 2 + [1] * 2
    for name, data in server.files.items():
        assert (cache / name).read_bytes() == data
        assert (cache / f"{name}.sha256").read_text() == f"{hashlib.sha256(data).hexdigest()}  {name}\n"
    np.testing.assert_array_equal(dm.sets["valid"].sketches[3], read_npz(cache / "bus.npz")["valid"][0])
    batch = next(iter(dm.train_dataloader()))
    assert batch["strokes"].shape == (2, dm.steps + 1, 5) and batch["label"].shape == (2,)

    again = SketchDataModule(categories=["cat", "bus"], cache_dir=str(cache), base_url=server.url, batch_size=2)
    again.setup("fit")  # served from the cache, checksums verified: no request
    assert len(server.requests) == 2 and again.sets["train"].labels == dm.sets["train"].labels


def test_default_cache_is_under_zoo_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "zc"))
    assert cache_dir("quickdraw") == tmp_path / "zc" / "quickdraw"
    server.files = {"hot air balloon.npz": npz_bytes(tmp_path, "balloon", 3)}
    dm = SketchDataModule(categories="hot air balloon", base_url=server.url, batch_size=2)
    dm.setup("fit")
    assert server.requests[0][0] == "/hot%20air%20balloon.npz" and dm.class_names == ["hot air balloon"]
    assert (tmp_path / "zc" / "quickdraw" / "hot air balloon.npz").is_file()
    monkeypatch.delenv("ZOO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("quickdraw") == tmp_path / "home" / ".cache" / "zoo" / "quickdraw"


def test_cut_connection_resumes_with_range_to_identical_bytes(server, tmp_path):
    data = npz_bytes(tmp_path, "cat", 1, 40)
    server.files = {"cat.npz": data}
    dest = tmp_path / "cache" / "cat.npz"
    cut = len(data) // 3
    server.cut_after = cut  # within one call: the retry resumes
    assert download(f"{server.url}/cat.npz", dest, retries=1) == dest
    etag = f'"{hashlib.md5(data).hexdigest()}"'
    assert server.requests == [("/cat.npz", None, None), ("/cat.npz", f"bytes={cut}-", etag)]
    assert dest.read_bytes() == data and not (tmp_path / "cache" / "cat.npz.part").exists()

    other = tmp_path / "cache2" / "cat.npz"  # across calls: the first gives up, the second resumes
    server.requests.clear()
    server.cut_after = cut
    with pytest.raises(ConnectionError) as failed:
        download(f"{server.url}/cat.npz", other, retries=0)
    assert str(failed.value) == (f"cannot download {server.url}/cat.npz: the connection closed after {cut} of "
                                 f"{len(data)} bytes; {cut} bytes are kept in {other}.part, run again to resume")
    assert not other.exists() and (tmp_path / "cache2" / "cat.npz.part").stat().st_size == cut
    download(f"{server.url}/cat.npz", other, retries=0)
    assert server.requests[-1][1] == f"bytes={cut}-" and other.read_bytes() == data


def test_a_file_changed_on_the_server_starts_over(server, tmp_path):
    old, new = npz_bytes(tmp_path, "a", 1, 40), npz_bytes(tmp_path, "b", 2, 50)
    server.files = {"cat.npz": old}
    server.cut_after = 100
    dest = tmp_path / "cat.npz"
    with pytest.raises(ConnectionError):
        download(f"{server.url}/cat.npz", dest, retries=0)
    server.files = {"cat.npz": new}  # a new ETag: If-Range makes the server send the whole new file
    download(f"{server.url}/cat.npz", dest, retries=0)
    assert server.requests[-1][1] == "bytes=100-" and dest.read_bytes() == new


def test_corrupt_cached_file_is_detected_and_downloaded_again(server, tmp_path, caplog):
    data = npz_bytes(tmp_path, "cat", 1)
    server.files = {"cat.npz": data}
    dest = tmp_path / "cat.npz"
    download(f"{server.url}/cat.npz", dest)
    dest.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    with caplog.at_level(logging.WARNING):
        download(f"{server.url}/cat.npz", dest)
    recorded = hashlib.sha256(data).hexdigest()
    assert f"{dest} has sha256 " in caplog.text and f"not the recorded {recorded}; downloading it again" in caplog.text
    assert len(server.requests) == 2 and dest.read_bytes() == data
    with pytest.raises(ValueError, match=f"has sha256 {recorded}, not the expected 00ff; it was deleted"):
        download(f"{server.url}/cat.npz", tmp_path / "other.npz", sha256="00ff")  # a published checksum
    assert not (tmp_path / "other.npz").exists() and not (tmp_path / "other.npz.part").exists()


def test_concurrent_downloads_of_one_file_take_turns(server, tmp_path, caplog):
    data = npz_bytes(tmp_path, "cat", 1, 40)
    server.files = {"cat.npz": data}
    server.delay = threading.Event()
    dest = tmp_path / "cat.npz"
    results, errors = [], []

    def fetch():  # each call opens the lock file itself, so flock sets them against each other
        try:
            results.append(download(f"{server.url}/cat.npz", dest))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    with caplog.at_level(logging.INFO, "zoo.data.download"):
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while "waiting for another process" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)  # until the second one waits on the lock the first one holds
        server.delay.set()  # only now may the first one finish
        for t in threads:
            t.join(10)
    assert "waiting for another process that is downloading" in caplog.text
    assert not errors and results == [dest, dest]
    assert len(server.requests) == 1 and dest.read_bytes() == data


def test_unknown_category_is_one_line_with_the_closest_names(tmp_path, capsys):
    with pytest.raises(ValueError) as e:
        SketchDataModule(categories="cat,catt")
    assert str(e.value) == ("unknown QuickDraw category 'catt'; closest: cat, castle, carrot, cactus, hat "
                            "(all 345: zoo.data.sketches.QUICKDRAW_CATEGORIES)")
    with pytest.raises(ValueError, match="listed twice"):
        SketchDataModule(categories=["cat", "bus", "cat"])
    with pytest.raises(ValueError, match="either path .* or categories"):
        SketchDataModule(path="cat.npz", categories="cat")
    code, err = run_main(capsys, "fit", *cli_args("sketch_rnn", tmp_path, "--data.categories=cat,the mona lisa"))
    assert code == 2 and error_lines(err) == [
        "error: unknown QuickDraw category 'the mona lisa'; closest: The Mona Lisa "
        "(all 345: zoo.data.sketches.QUICKDRAW_CATEGORIES)"]


def test_missing_file_names_the_url(server, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        SketchDataModule(categories="cat", cache_dir=str(tmp_path), base_url=server.url).setup("fit")
    assert error_line(e.value) == f"error: cannot download {server.url}/cat.npz: HTTP 404 Not Found"


def test_unwritable_cache_dir_is_one_line_naming_it_and_the_fix(server, tmp_path, capsys):
    server.files = {"cat.npz": npz_bytes(tmp_path, "cat", 1)}
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "cache"  # under a regular file: not writable, whoever runs the test
    code, err = run_main(capsys, "fit", *cli_args("sketch_rnn", tmp_path, "--data.categories=cat",
                                                  f"--data.cache_dir={folder}", f"--data.base_url={server.url}"))
    assert code == 2 and error_lines(err) == [
        f"error: cannot write to the cache folder '{folder}' (Not a directory); choose another with "
        "--data.cache_dir DIR (cache_dir=) or the ZOO_CACHE environment variable"]
    assert not server.requests
