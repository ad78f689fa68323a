"""TSLRec orchestration: stage 1 (reconstruction) -> stage 2 (augmentation) -> the item-embedding table.

Outputs, under ``<checkpoint_dir>/<dataset>/tslrec/<hash>/`` where the hash covers :data:`STAGE_KEYS`, the prompt
template and head version, the language model's files and the data (training prefixes and item names):

* ``categories.npy`` — latent category per item id (k-means on the helper model's item embeddings);
* ``stage1.pt`` — the user-level SFT checkpoint (trained weights, head, optimizer; one per epoch, resumable);
* ``stage1.json`` — users (all / trained, subsample or not), steps, MSE and seconds per epoch, category sizes;
* ``table-lm.npy`` (+ ``.ids.json``) — the tuned LM's representation of every item (one-item virtual users);
* ``table-pca<width>.npy`` (+ ``.ids.json``) — the same projected by PCA to the backbone's item-embedding width.

The helper model that stage 1 clusters is LLMSeR's forward CCG helper (:mod:`recbole_llmser.helper_models`,
``ccg_*`` settings, training prefixes only), saved under an explicit name with a fingerprint of its settings and data in
``<checkpoint_dir>/<dataset>/augment/models/``, so ``llmser+tslrec`` trains it once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path

import numpy as np

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.item_text import item_texts, prompt_titles
from recbole_llmser.schema import STAGE_KEYS
from recbole_llmser.tslrec import stage1, stage2
from recbole_llmser.tslrec.lm import resolve_lm
from recbole_llmser.registry import get_model
from recbole_llmser.sequences import dataset_prefixes
from recbole_llmser.utils import content_hash


@dataclass
class Inputs:
    users: np.ndarray   # internal user ids
    prefixes: list      # per user: the training prefix (item ids; sequence minus validation and test items)
    names: np.ndarray   # per item id: its prompt name (title, or "item <token>"); row 0 (padding) ""


def item_names(config, dataset) -> np.ndarray:
    """Each item's name in prompts: its capped title (``item_text_field``), else ``item <RecBole token>``."""
    field = config["item_text_field"]
    names = prompt_titles(dataset, item_texts(dataset, field) if field else None, int(config["title_max_chars"]))
    names[0] = ""
    return np.array(names, dtype=object)


def inputs_of(config, dataset) -> Inputs:
    users, prefixes = dataset_prefixes(config, dataset)
    return Inputs(users, prefixes, item_names(config, dataset))


def stage_dir(config, inputs: Inputs, lm_fingerprint: str) -> Path:
    """``<checkpoint_dir>/<dataset>/tslrec/<hash of STAGE_KEYS, prompt template, LM files and data>``."""
    digest = content_hash({k: str(config[k]) for k in STAGE_KEYS}, inputs.prefixes,
                          f"{stage1.STAGE_VERSION}|{lm_fingerprint}|".encode(),
                          json.dumps(list(inputs.names), ensure_ascii=False).encode())
    return Path(config["checkpoint_dir"]).resolve() / config["dataset"] / "tslrec" / digest[:16]


def backbone_width(config, dataset) -> int:
    """Width of the backbone's item embedding (``hidden_size`` for SASRec, ``embedding_size`` for GRU4Rec, ...),
    read from a model built on the dataset."""
    model = get_model(config["model"])(config, dataset)
    emb = getattr(model, "item_embedding", None)
    if emb is None:
        raise LLMSeRError(f"TSLRec: {config['model']} has no item_embedding table to initialize")
    return int(emb.embedding_dim)


def build_table(config, dataset, stage: str = "all", dry_run: bool = False):
    """Run (or reuse) TSLRec's stages for ``dataset`` (our unbuilt SequentialDataset); returns the table's path
    (``stage: reconstruct``: the stage-1 checkpoint's path; ``dry_run``: prints the plan, returns None)."""
    logger = getLogger()
    inputs = inputs_of(config, dataset)
    spec = resolve_lm(config)
    out = stage_dir(config, inputs, spec.fingerprint())
    projection = config["tsl_projection"]
    width = backbone_width(config, dataset) if projection == "pca" else 0
    table = out / stage2.table_name(projection, width)
    if dry_run:
        n = sum(1 for p in inputs.prefixes if len(p))
        used = min(n, config["tsl_max_users"] or n)
        steps = -(-used // int(config["tsl_batch_size"]))
        print(f"dry run (TSLRec, {spec.label}; no LLM API calls): stage 1 trains on {used} of {n} users with a "
              f"training prefix (one sample each), {steps} steps per epoch x {config['tsl_epochs']} epoch(s)"
              + (f", at most {config['tsl_max_steps']} steps" if config["tsl_max_steps"] else "")
              + f"; stage 2 embeds {dataset.item_num - 1} items; output {out}"
              + (" (table cached)" if table.is_file() else ""))
        return None
    if stage != "reconstruct" and table.is_file() and stage2.ids_path(table).is_file():
        logger.info(f"TSLRec: reusing the item-embedding table {table} (same configuration and data)")
        return table
    out.mkdir(parents=True, exist_ok=True)
    logger.info(f"TSLRec: {spec.label}, output {out}")
    models_dir = Path(config["checkpoint_dir"]).resolve() / config["dataset"] / "augment" / "models"

    def tuned():
        return stage1.run(config, dataset, inputs, out, spec, models_dir)

    if stage == "reconstruct":
        tuned()
        return out / "stage1.pt"
    return stage2.run(config, inputs, out, tuned, dataset.field2id_token[dataset.iid_field], width)
