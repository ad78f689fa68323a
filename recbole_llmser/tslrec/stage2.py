"""TSLRec stage 2 — information augmentation: the tuned language model embeds every item.

Each item alone is a one-item "virtual user": the stage-1 prompt of that single item goes through the tuned LM and
its pooled representation is the item's LLM-enhanced embedding. The table is then

* ``tsl_projection: pca``: projected by PCA (scikit-learn, fitted on the items) to the width of the backbone's
  item embedding (``hidden_size``; ``embedding_size`` for GRU4Rec-like models) and saved as ``table-pca<width>.npy``;
* ``tsl_projection: learned``: saved as is (``table-lm.npy``, width = the LM's hidden size); a linear projection
  to the backbone's width trains with the backbone (``tslrec/inject.py``).

``table-lm.npy`` is always written (it is what PCA starts from), so another backbone width costs only a PCA.

Every table has one row per item in RecBole's internal id order (row 0 = padding, all zeros) and an id map beside
it (``<stem>.ids.json``: the RecBole item tokens in that order, and how the table was made); both are written
atomically.
"""

from __future__ import annotations

import json
import time
from logging import getLogger
from pathlib import Path

import numpy as np

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.tslrec.stage1 import user_prompt
from recbole_llmser.utils import atomic_file, atomic_write_json

TABLE_FORMAT = 1


def ids_path(table_path) -> Path:
    """The id map beside a table: ``x.npy`` -> ``x.ids.json``."""
    return Path(table_path).with_suffix(".ids.json")


def table_name(projection: str, width: int) -> str:
    return f"table-pca{int(width)}.npy" if projection == "pca" else "table-lm.npy"


def item_prompts(names) -> list[str]:
    """One virtual-user prompt per item id 1.. (row 0, padding, has none)."""
    return [user_prompt([name]) for name in names[1:]]


def pca_project(reps: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Rows 1.. of ``reps`` projected on their first ``dim`` principal components (row 0 stays zero)."""
    from sklearn.decomposition import PCA

    n, width = reps.shape[0] - 1, reps.shape[1]
    if dim > min(n, width):
        raise LLMSeRError(f"tsl_projection=pca: the backbone's item-embedding width {dim} is larger than the LM's "
                          f"width ({width}) or the number of items ({n}); use --tsl_projection=learned")
    out = np.zeros((n + 1, dim), dtype=np.float32)
    out[1:] = PCA(n_components=dim, random_state=seed).fit_transform(np.asarray(reps[1:], np.float64))
    return out


def save_table(path, table: np.ndarray, item_tokens, **meta) -> Path:
    """Write ``table`` (.npy) and its id map (``.ids.json``) atomically."""
    if table.shape[0] != len(item_tokens):
        raise ValueError(f"table has {table.shape[0]} rows for {len(item_tokens)} item tokens")
    atomic_write_json(ids_path(path), {"format": TABLE_FORMAT, "item_tokens": [str(t) for t in item_tokens],
                                       "rows": int(table.shape[0]), "width": int(table.shape[1]), **meta})
    with atomic_file(path, "wb") as f:  # the table last: a table on disk always has its id map
        np.save(f, np.asarray(table, dtype=np.float32))
    return Path(path)


def load_table(path, item_tokens=None) -> tuple[np.ndarray, dict]:
    """``(table, id map)`` from a table written by :func:`save_table`; with ``item_tokens`` (the dataset's
    RecBole item tokens in id order) checks that the table's rows are exactly those items."""
    path = Path(path)
    meta_path = ids_path(path)
    if not path.is_file() or not meta_path.is_file():
        raise LLMSeRError(f"tsl_embedding_file={path}: needs the table and its id map {meta_path.name} beside it "
                          "(both made by --method=tslrec --stage=augment)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise LLMSeRError(f"tsl_embedding_file={path}: unreadable table or id map ({err}); build it again") from None
    tokens = meta.get("item_tokens") if isinstance(meta, dict) else None
    if table.ndim != 2 or not isinstance(tokens, list) or table.shape[0] != len(tokens):
        raise LLMSeRError(f"tsl_embedding_file={path}: expected a 2-D table with one row per token of "
                          f"{meta_path.name}; build it again")
    if item_tokens is not None:
        ours = [str(t) for t in item_tokens]
        if tokens != ours:
            row = next((i for i, (a, b) in enumerate(zip(tokens, ours)) if a != b), min(len(tokens), len(ours)))
            raise LLMSeRError(
                f"tsl_embedding_file={path}: its items do not match this dataset's ({len(tokens)} vs {len(ours)} "
                f"rows, first difference at row {row}); build the table for this dataset (--stage=augment)")
    return table.astype(np.float32, copy=False), meta


def run(config, inputs, out_dir, tuned, item_tokens, width: int) -> Path:
    """Stage 2: embed every item with the tuned LM (``tuned()`` -> ``(lm, tokenizer, pooling)``, called only when
    the representations are not cached) and save the table for ``tsl_projection`` (PCA to ``width``); returns
    its path."""
    from recbole_llmser.tslrec.lm import encode

    logger = getLogger()
    path = out_dir / table_name(config["tsl_projection"], width)
    reps_path = out_dir / "table-lm.npy"
    if ids_path(reps_path).is_file() and reps_path.is_file():
        reps, _ = load_table(reps_path, item_tokens)
    else:
        lm, tokenizer, pooling = tuned()
        prompts = item_prompts(inputs.names)
        logger.info(f"TSLRec stage 2: embedding {len(prompts)} items as one-item virtual users")
        start = time.monotonic()
        rows = encode(lm, tokenizer, prompts, pooling, int(config["tsl_max_tokens"]), int(config["tsl_batch_size"]),
                      "TSLRec stage 2", bool(config["show_progress"]))
        logger.info(f"TSLRec stage 2: {len(prompts)} items embedded in {time.monotonic() - start:.1f} s")
        reps = np.zeros((len(prompts) + 1, rows.shape[1]), dtype=np.float32)
        reps[1:] = rows
        save_table(reps_path, reps, item_tokens, projection="none", stage1=str(out_dir))
    if config["tsl_projection"] == "pca":
        table = pca_project(reps, width, int(config["seed"]))
        save_table(path, table, item_tokens, projection="pca", stage1=str(out_dir))
    logger.info(f"TSLRec stage 2: item-embedding table {path} ({reps.shape[0]} rows)")
    return path
