"""The on-disk cache of item text embeddings: computed once per (dataset, text field, backend + model, texts)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from recbole_llmser.augment.semantic import CACHE_FORMAT, SemanticBackend, scrub
from recbole_llmser.augment.similarity import clean_texts, texts_sha256
from recbole_llmser.utils import atomic_file, atomic_write_json

logger = logging.getLogger(__name__)


def _safe(part: str, limit: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(part)).strip("._") or "x"
    if len(s) > limit:
        s = s[:limit] + "-" + hashlib.sha256(str(part).encode()).hexdigest()[:8]
    return s


def cache_paths(cache_dir, dataset_name: str, text_field: str, backend: SemanticBackend, digest: str):
    """(vectors .npy, sidecar .json) for one (dataset, field, backend+model, texts) combination."""
    model = backend.model_id
    stem = ".".join([_safe(dataset_name), _safe(text_field), backend.name,
                     hashlib.sha256(model.encode()).hexdigest()[:12], digest[:12]])
    folder = Path(cache_dir)
    return folder / f"{stem}.npy", folder / f"{stem}.json"


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _load_cached(npy: Path, side: Path, expect: dict) -> np.ndarray | None:
    if not (npy.is_file() and side.is_file()):
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("semantic cache: unreadable sidecar %s; recomputing", side)
        return None
    for key, value in expect.items():
        if meta.get(key) != value:
            logger.info("semantic cache: %s differs (%r != %r); recomputing", key, meta.get(key), value)
            return None
    try:
        array = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.warning("semantic cache: unreadable %s (%s); recomputing", npy, scrub(err, None))
        return None
    if array.dtype != np.float32 or array.shape != (expect["n_items"], meta.get("dim")):
        logger.warning("semantic cache: %s has shape %s, sidecar says (%s, %s); recomputing", npy, array.shape,
                       expect["n_items"], meta.get("dim"))
        return None
    return array


def item_embeddings(backend: SemanticBackend, texts: Sequence, cache_dir, dataset_name: str,
                    text_field: str) -> np.ndarray:
    """Embeddings of the item texts, ``(len(texts), dim)`` float32, row i = ``texts[i]``.

    Computed once per (dataset, text field, backend + model id, texts) and stored under ``cache_dir`` as
    ``<dataset>.<field>.<backend>.<model hash>.<texts hash>.npy`` (written to a temp file, then renamed) with a
    JSON sidecar (backend, model, n_items, texts sha256, dim); loaded with ``np.load(allow_pickle=False)`` when
    the sidecar matches, recomputed and rewritten otherwise. ``cache_dir=None`` disables the cache.
    An unfitted tfidf backend is fitted on ``texts`` first.
    """
    texts = clean_texts(texts)
    if not backend.ready:
        backend.fit(texts)
    digest = texts_sha256(texts)
    if cache_dir is None:
        return backend.encode(texts)
    npy, side = cache_paths(cache_dir, dataset_name, text_field, backend, digest)
    expect = {"format": CACHE_FORMAT, "backend": backend.name, "model": backend.model_id,
              "n_items": len(texts), "texts_sha256": digest}
    cached = _load_cached(npy, side, expect)
    if cached is not None:
        logger.info("semantic cache: loaded %s item vectors from %s", cached.shape, npy)
        return cached
    start = time.perf_counter()
    vectors = backend.encode(texts)
    seconds = time.perf_counter() - start
    logger.info("semantic: embedded %d %s texts with %s in %.1f s", len(texts), text_field, backend.model_id, seconds)
    _atomic_save_npy(npy, vectors)
    atomic_write_json(side, {**expect, "dataset": dataset_name, "text_field": text_field,
                             "dim": int(vectors.shape[1]), "dtype": "float32", "seconds": round(seconds, 3)})
    return vectors
