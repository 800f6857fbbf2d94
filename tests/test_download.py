import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from irbase.download import DownloadError, download


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Server:
    """Serves files on loopback with HTTP Range; can cut the first response short to test resuming."""

    def __init__(self, files: dict[str, bytes], cut_first: bool = False):
        self.files, self.cut_first, self.requests = files, cut_first, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.requests.append((name, self.headers.get("Range")))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data, start = outer.files[name], 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if outer.cut_first and len(outer.requests) == 1:
                    body = body[: len(body) // 2]  # the connection drops midway
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fixture_files():
    collection = b"".join(b"%d\tpassage number %d\n" % (i, i) for i in range(1, 4000))
    archive = _tar_gz({"collection.tsv": collection,
                       "queries.dev.small.tsv": b"9\tquery\n", "qrels.dev.small.tsv": b"9\t0\t1\t1\n"})
    return {"collectionandqueries.tar.gz": archive, "qrels/dev.tsv": b"query-id\tcorpus-id\tscore\n9\t1\t1\n"}


def _sources(tmp_path, files, md5_override=None):
    lines = ["msmarco:", "  base_url: http://unused/", "  files:"]
    for name, data in files.items():
        md5 = md5_override or hashlib.md5(data).hexdigest()
        lines += [f"    - name: {name}", f'      md5: "{md5}"']
        if name.endswith(".tar.gz"):
            lines.append("      extract: true")
    path = tmp_path / "sources.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_download_resumes_verifies_and_extracts(tmp_path, fixture_files):
    server = Server(fixture_files, cut_first=True)
    try:
        dest = tmp_path / "msmarco"
        written = download("msmarco", dest, base_url=server.url, sources_file=_sources(tmp_path, fixture_files),
                           progress=False)
    finally:
        server.close()
    ranges = [r for name, r in server.requests if name == "collectionandqueries.tar.gz"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"  # resumed
    assert (dest / "collection.tsv").read_bytes().startswith(b"1\tpassage number 1\n")
    assert (dest / "qrels" / "dev.tsv").is_file()
    assert not (dest / "collectionandqueries.tar.gz").exists()  # archive removed after extraction
    assert {p.name for p in written} >= {"collection.tsv", "queries.dev.small.tsv", "dev.tsv"}
    from irbase.dataset import Dataset
    assert Dataset.from_dir(dest, "dev.small").qrels == {"9": {"1": 1}}


def test_checksum_mismatch_is_refused_and_not_kept(tmp_path, fixture_files):
    server = Server(fixture_files)
    try:
        with pytest.raises(DownloadError, match="md5 mismatch"):
            download("msmarco", tmp_path / "d", base_url=server.url, progress=False,
                     sources_file=_sources(tmp_path, fixture_files, md5_override="0" * 32))
    finally:
        server.close()
    assert not any((tmp_path / "d").rglob("*.tar.gz*"))


def test_http_error_is_reported(tmp_path):
    server = Server({})
    try:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download("msmarco", tmp_path / "d", base_url=server.url, progress=False,
                     sources_file=_sources(tmp_path, {"missing.tsv": b""}))
    finally:
        server.close()


def test_unquoted_numeric_md5_is_rejected(tmp_path):
    from irbase.download import load_sources
    path = tmp_path / "s.yaml"
    path.write_text("msmarco:\n  base_url: http://x/\n  files:\n    - name: a\n      md5: 00000000000000000000000000000000\n")
    with pytest.raises(ValueError, match="must be a quoted 32-digit hex string"):
        load_sources("msmarco", path)
    assert load_sources("msmarco")[0].md5 == "31644046b18952c1386cd4564ba2ae69"
