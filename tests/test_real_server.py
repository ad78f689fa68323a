"""A real OpenAI-compatible server with a real instruct model (slow; not in ``make test``).

``make test-slow`` builds what it needs (``make llm-server-install``: llama-cpp-python's server in .venv-llm and
Qwen2.5-Coder-0.5B-Instruct Q4_K_M from PyPI in models/) and runs::

    LLM_SERVER_PYTHON=.venv-llm/bin/python LLM_GGUF=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        .venv/bin/python -m pytest -q -m slow

The test starts ``python -m llama_cpp.server`` on 127.0.0.1, then runs ``run_recbole_llmser.py --stage=augment``
with the package's default LLM settings (structured output on) on 20 users of the bundled amazon-beauty (their
items and titles), through the real ``openai`` client: the artifact, the structured-output mode the server
accepted, the echo-rate report and the cache (a second run makes no call) are checked.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_PYTHON = os.environ.get("LLM_SERVER_PYTHON", str(REPO / ".venv-llm" / "bin" / "python"))
GGUF = os.environ.get("LLM_GGUF", str(REPO / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (Path(SERVER_PYTHON).is_file() and Path(GGUF).is_file()):
        pytest.fail(f"no llama.cpp server ({SERVER_PYTHON}) or model ({GGUF}): run `make llm-server-install`")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([SERVER_PYTHON, "-m", "llama_cpp.server", "--model", GGUF, "--host", "127.0.0.1",
                                 "--port", str(port), "--n_ctx", "4096"], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
                model = json.load(r)["data"][0]["id"]
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the llama.cpp server did not start: {log.read_text()[-2000:]}")
            time.sleep(1)
    yield base, model, log
    proc.terminate()
    proc.wait(timeout=30)


def write_beauty_subset(folder: Path, n_users: int = 20) -> None:
    """The first ``n_users`` users of the bundled amazon-beauty (all their interactions) and their items' rows."""
    source = REPO / "dataset" / "amazon-beauty"
    folder.mkdir(parents=True)
    users, items = [], set()
    with open(source / "amazon-beauty.inter", encoding="utf-8") as f, \
            open(folder / "beauty20.inter", "w", encoding="utf-8") as out:
        reader = csv.reader(f, delimiter="\t")
        out.write("\t".join(next(reader)) + "\n")
        for row in reader:
            if row[0] not in users:
                if len(users) == n_users:
                    continue
                users.append(row[0])
            items.add(row[1])
            out.write("\t".join(row) + "\n")
    with open(source / "amazon-beauty.item", encoding="utf-8") as f, \
            open(folder / "beauty20.item", "w", encoding="utf-8") as out:
        out.write(f.readline())
        out.writelines(line for line in f if line.split("\t", 1)[0] in items)


def augment(data, saved, base, model, cwd):
    env = {**os.environ, "OPENAI_BASE_URL": base, "OPENAI_API_KEY": "local"}
    cmd = [sys.executable, str(REPO / "run_recbole_llmser.py"), "--model=SASRec", "--dataset=beauty20",
           "--stage=augment", f"--data_path={data}", f"--checkpoint_dir={saved}", "--llm_backend=openai",
           f"--llm_model={model}", "--ccg_epochs=2", "--MAX_ITEM_LIST_LENGTH=20", "--ccg_max_len=20",
           "--llm_concurrency=1", "--llm_timeout=300", "--show_progress=False", "--use_gpu=False"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_augment_against_a_real_llama_cpp_server(server, tmp_path):
    base, model, server_log = server
    data, saved = tmp_path / "data", tmp_path / "saved"
    write_beauty_subset(data / "beauty20")
    out = augment(data, saved, base, model, tmp_path)

    summary_file = next(saved.glob("beauty20/augment/*/summary.json"))
    summary = json.loads(summary_file.read_text())
    assert summary["backend"] == "llm" and summary["llm_model"] == model
    assert summary["users"] == 20 and summary["augmented_users"] > 0
    llm = summary["llm"]
    # the server refuses json_schema (HTTP 500); the run steps down once and says which mode it used
    assert llm["output_mode"] in ("json_schema", "json_object", "text")
    assert f"output mode {llm['output_mode']}" in out
    if llm["output_mode"] != "json_schema":
        assert "rejects response_format json_schema" in out
    assert llm["calls"] > 0 and not summary["llm_failed"]["snf"]
    for stage in ("snf", "arv"):
        rate = summary["llm_echo"][stage]
        assert rate["answers"] > 0 and rate["rate"] is not None
    assert "repeat the presented candidate order" in out  # the echo report, per stage, in the log
    artifact = [json.loads(line) for line in Path(summary["artifact"]).read_text().splitlines()]
    assert artifact and all(r["pseudo_items"] for r in artifact if r.get("pseudo_items") is not None)
    cache = list(saved.glob("beauty20/augment/**/*cache*.jsonl"))
    assert cache and sum(len(c.read_text().splitlines()) for c in cache) >= llm["calls"]

    print(json.dumps({k: summary[k] for k in ("llm", "llm_echo", "augmented_users", "mean_w")}, indent=1))

    shutil.rmtree(summary_file.parent)  # the artifact is rebuilt, its LLM answers come from the cache: no call
    again = augment(data, saved, base, model, tmp_path)
    summary = json.loads(summary_file.read_text())
    assert summary["llm"]["calls"] == 0 and summary["llm"]["cache_hits"] == llm["calls"], again[-2000:]
