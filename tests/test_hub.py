"""Offline, every command that needs the hub fails within 5 seconds with one error that names the id and the fix.

Each command runs as a user runs it (`python -m lorafuse ...` in a fresh process: interpreter start and imports
count), with an empty HF cache. The bound is the user-facing promise of lorafuse.hub (transformers alone retries an
unreachable hub for about a minute), so the tests time the whole command.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lorafuse import hub

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_EXAMPLE = ROOT / "examples" / "llama2-7b-dolly-ja-qlora.yaml"
BOUND_S = 5.0
MISSING = "nobody-here/no-such-model"

COMMANDS = {
    "train": ["train", f"model.path={MISSING}", "output.dir=run"],
    "data preview": ["data", "preview", str(LLAMA2_EXAMPLE), "-n", "1"],
    "plan": ["plan", f"model.path={MISSING}"],
    "generate": ["generate", "--model", MISSING, "--prompt", "hi"],
    "chat": ["chat", "--model", MISSING],
    "merge": ["merge", "--model", MISSING, "--adapter", "adapter", "--out", "merged"],
    "export": ["export", "--model", MISSING, "--adapter", "adapter", "--out", "model.gguf"],
}


def _run(args: list[str], cwd: Path, **env) -> tuple[int, str, float]:
    full_env = {**os.environ, "HF_HOME": str(cwd / "hf-home"), "HF_HUB_OFFLINE": "1", **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    full_env.pop("HF_HUB_CACHE", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lorafuse", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    return proc.returncode, proc.stderr, time.perf_counter() - start


def _assert_fast_hub_error(rc: int, err: str, seconds: float, repo_id: str, key: str) -> None:
    assert rc == 2, err
    assert f"error: the hub cannot be reached: {repo_id} is not in the local cache" in err
    assert "download it on a connected machine (huggingface-cli download" in err and f"point {key} at a local" in err
    assert "Traceback" not in err
    assert seconds < BOUND_S, f"the command took {seconds:.1f} s to fail offline"


@pytest.mark.parametrize("command", COMMANDS, ids=list(COMMANDS))
def test_offline_each_command_fails_fast_naming_the_id(command, tmp_path):
    rc, err, seconds = _run(COMMANDS[command], tmp_path)
    repo_id = "meta-llama/Llama-2-7b-hf" if command == "data preview" else MISSING
    key = "--model" if command in ("generate", "chat", "merge", "export") else "model.path"
    _assert_fast_hub_error(rc, err, seconds, repo_id, key)


def _cache_snapshot(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A model snapshot in the hub cache layout huggingface_hub reads offline (refs/main -> snapshots/<commit>)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def test_offline_preview_with_the_tokenizer_cached_names_the_data_set(tmp_path, tiny_model_dir):
    pytest.importorskip("datasets")
    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.suffix != ".safetensors"}
    _cache_snapshot(tmp_path / "hf-home", "meta-llama/Llama-2-7b-hf", files)
    rc, err, seconds = _run(COMMANDS["data preview"], tmp_path)
    _assert_fast_hub_error(rc, err, seconds, "kunishou/databricks-dolly-15k-ja", "data.path")
    assert "--repo-type dataset kunishou/databricks-dolly-15k-ja" in err


class _Silent:
    """A TCP server that accepts connections and never answers: a hub behind a network that drops the traffic."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()


def test_no_network_without_the_offline_flag_fails_within_the_bound(tmp_path):
    with _Silent() as endpoint:
        rc, err, seconds = _run(COMMANDS["train"], tmp_path, HF_HUB_OFFLINE=None, HF_ENDPOINT=endpoint)
    _assert_fast_hub_error(rc, err, seconds, MISSING, "model.path")
    assert f"no answer from {endpoint}" in err


def _serve(status: int):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("status,is_hub", [(200, True), (401, True), (404, False), (502, False)])
def test_only_an_answer_the_hub_gives_counts_as_reachable(status, is_hub):
    server, endpoint = _serve(status)
    try:
        assert hub.reachable(endpoint) is is_hub
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "text,expected",
    [("meta-llama/Llama-2-7b-hf", True), ("builtin:tiny-llama", False), ("./a/b", False), ("a/b/c", False)],
)
def test_is_hub_id(text, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id(text) is expected
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not hub.is_hub_id("owner/name")  # a folder here is a path, not an id


def test_a_cached_snapshot_is_used_offline(tmp_path, monkeypatch):
    _cache_snapshot(tmp_path / "hf-home", "owner/cached", {"config.json": json.dumps({"a": 1}).encode()})
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = hub.hub_source("owner/cached")
    assert json.loads((Path(folder) / "config.json").read_text()) == {"a": 1}
