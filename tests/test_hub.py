"""Loading a base LM by hub id, as a user with internet does, against a loopback server that answers
like the Hugging Face hub (HF_ENDPOINT): no outside network."""
import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.conftest import PASSAGES, make_tiny_lm

REPO = Path(__file__).resolve().parents[1]


def _hub(repos: dict[str, dict[str, bytes]]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body: bool) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if "resolve" in parts:  # /{org}/{name}/resolve/{revision}/{file}
                at = parts.index("resolve")
                files = repos.get("/".join(parts[:at]), {})
                data = files.get("/".join(parts[at + 2:]))
                if data is not None:
                    self.send_response(200)
                    self.send_header("X-Repo-Commit", "0" * 40)
                    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if body:
                        self.wfile.write(data)
                    return
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hub_id_downloads_and_embedding_repos_are_refused(tmp_path):
    model = make_tiny_lm(tmp_path / "tiny", "encoder", list(PASSAGES.values()))
    files = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    server = _hub({"someorg/tiny-bert": files,
                   "someorg/innocent-name": {**files, "modules.json": b"[]"}})
    try:
        code = (
            "from irbase.lm import BaseLMConfig, BaseModelRefused\n"
            "from biencoder.model import BiEncoder, BiEncoderConfig\n"
            "m = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name='someorg/tiny-bert', num_layers=2)))\n"
            "print('shape', m.encode(['the capital of australia'], 'query').shape)\n"
            "try:\n"
            "    BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name='someorg/innocent-name')))\n"
            "except BaseModelRefused as exc:\n"
            "    print('refused', exc)\n")
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"),
               "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        env.pop("HF_HUB_OFFLINE", None)
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert "shape (1, 32)" in result.stdout, result.stderr[-2000:]
    assert "refused someorg/innocent-name is a sentence-embedding checkpoint (has modules.json)" in result.stdout
    assert (tmp_path / "hf" / "hub" / "models--someorg--tiny-bert").is_dir()  # downloaded into the HF cache
