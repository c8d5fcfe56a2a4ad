"""Hub ids when online: the download rule fetches config.json and the safetensors weights only,
from a Hub-compatible endpoint served here (HF_ENDPOINT), into HF_HOME; the run then works
offline from that cache."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_ok, make_llama_checkpoint, run_snakemake

pytestmark = pytest.mark.workflow

COMMIT = "a" * 40
REPO_ID = "acme/tiny-llama"


class FakeHub:
    """Serves ``/{repo}/resolve/{rev}/{file}`` (HEAD and GET) as the Hub does, and records
    which files were requested; everything else is answered 404."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.requests = files, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body: bool):
                prefix = f"/{REPO_ID}/resolve/main/"
                path = None
                if self.path.startswith(prefix):  # file requests; other API calls get 404
                    name = self.path.split("?")[0].removeprefix(prefix)
                    hub.requests.append((self.command, name))
                    path = hub.files.get(name)
                if path is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_download_rule_then_offline_run(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_llama_checkpoint(tmp_path / "single"))
    repo = tmp_path / "repo"
    model.save_pretrained(repo, max_shard_size="60KB")
    (repo / "tokenizer.json").write_text("{}")  # present on the hub, never needed
    hub = FakeHub({p.name: p for p in repo.iterdir()})
    try:
        env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url,
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        config = {"models": {"tiny": {"source": REPO_ID}}, "top_k": 4, "device": "cpu"}
        work = tmp_path / "run"
        # Planning online fetches config.json only; `download` fetches the weights.
        assert_ok(run_snakemake(work, "download", config=config, env=env))
    finally:
        hub.close()
    fetched = {name for method, name in hub.requests if method == "GET"}
    shards = {p.name for p in repo.glob("*.safetensors")}
    assert len(shards) >= 3
    assert fetched == {"config.json", "model.safetensors.index.json", *shards}
    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-llama" / "snapshots" / COMMIT
    assert {p.name for p in snapshot.iterdir()} == {"config.json",
                                                    "model.safetensors.index.json", *shards}
    # Compute nodes: offline, from the cache, equal to the same checkpoint read locally.
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    assert_ok(run_snakemake(work, config=config, env=offline))
    local = tmp_path / "local"
    assert_ok(run_snakemake(local, config={**config, "models": {"tiny": {"source": str(repo)}}}))
    for rel in ["bases/layers000-003/vectors.npy", "k4/similarity_head0.npy"]:
        assert np.array_equal(np.load(work / "results/tiny" / rel),
                              np.load(local / "results/tiny" / rel)), rel
