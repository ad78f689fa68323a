"""TSLRec stage 1 — information reconstruction (user-level SFT on latent categories).

1. Item embeddings of a pretrained sequential model: the forward helper of :mod:`recbole_llmser.helper_models`
   (``ccg_*`` settings), trained on the users' TRAINING PREFIXES only (sequence minus validation and test items).
2. k-means (scikit-learn, ``tsl_num_categories`` = K, seeded) on those embeddings: each item's cluster is its
   latent category (:func:`kmeans_categories`).
3. Per user the target g_u = the normalized histogram of latent categories over the training prefix
   (:func:`category_histograms`); validation and test items are never counted.
4. The language model reads a prompt describing the training prefix (:func:`user_prompt`: item titles, or item-id
   tokens for a dataset without text), its pooled final representation goes through a linear head (H -> K,
   :func:`make_head`) and is trained with MSE to g_u: ONE SAMPLE PER USER (:func:`fit`). Full fine-tuning, or
   LoRA (``tsl_lora``).

:func:`fit` writes an atomic checkpoint after every epoch (trainable weights, head, optimizer, losses) and resumes
from it; ``tsl_max_users`` (a seeded subsample of users, logged as a warning) and ``tsl_max_steps`` bound the
cost on a CPU.
"""

from __future__ import annotations

import math
import time
from logging import getLogger

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.helper_models import train_helper
from recbole_llmser.tslrec.lm import represent
from recbole_llmser.utils import atomic_file, atomic_write_json

#: Version of :func:`user_prompt`'s text and :func:`make_head`; part of the stage hash (a change rebuilds the stages).
STAGE_VERSION = "tslrec-v2"


# ----- the method's maths (pure) ----------------------------------------------------------------------------
def kmeans_categories(item_embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Latent category per item id: k-means on rows 1.. of ``item_embeddings`` (row 0 = padding gets -1)."""
    from sklearn.cluster import KMeans

    n = item_embeddings.shape[0] - 1
    if not 2 <= k <= n:
        raise LLMSeRError(f"property 'tsl_num_categories' = {k}: expected 2 <= K <= the number of items ({n})")
    labels = KMeans(n_clusters=k, random_state=seed, n_init=4).fit_predict(np.asarray(item_embeddings[1:], np.float64))
    return np.concatenate([[-1], labels]).astype(np.int64)


def category_histograms(sequences, categories: np.ndarray, k: int) -> np.ndarray:
    """g_u per sequence: counts of each latent category among its items, divided by the sequence length
    (float32, rows sum to 1; an empty sequence gives a zero row)."""
    out = np.zeros((len(sequences), k), dtype=np.float32)
    for row, seq in enumerate(sequences):
        if len(seq):
            out[row] = np.bincount(categories[np.asarray(seq, dtype=np.int64)], minlength=k)[:k] / len(seq)
    return out


def user_prompt(titles) -> str:
    """The text the language model reads for one (possibly virtual, one-item) user, oldest item first."""
    return "Items this user interacted with, oldest first: " + "; ".join(titles) + "."


def subsample_users(n: int, max_users: int | None, seed: int) -> np.ndarray:
    """Indices of the users stage 1 trains on: all, or a seeded sorted subsample of ``max_users``."""
    if max_users is None or max_users >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_users, replace=False))


# ----- user-level SFT ---------------------------------------------------------------------------------------
def make_head(hidden: int, k: int) -> nn.Module:
    """The linear head on the pooled representation. A parameter-free layer norm comes first: causal LMs' final
    hidden states have a few huge dimensions, which would otherwise dominate the regression."""
    return nn.Sequential(nn.LayerNorm(hidden, elementwise_affine=False), nn.Linear(hidden, k))


def trainable_state(model: nn.Module) -> dict:
    """The parameters that train (every weight, or only LoRA's), on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise LLMSeRError(f"TSLRec: the stage-1 checkpoint lacks {len(missing)} trained weights (e.g. {missing[0]}); "
                          "delete it to train again")
    model.load_state_dict(state, strict=False)


def fit(lm, head, tokenizer, prompts, targets, *, pooling: str, epochs: int, batch_size: int, lr: float,
        max_tokens: int, max_steps: int | None = None, seed: int = 0, checkpoint=None, fingerprint: str = "",
        show_progress: bool = False) -> dict:
    """Train ``lm`` + ``head`` so that head(pool(lm(prompt_u))) ≈ targets[u] (MSE), one sample per user.

    Returns the training record ``{"epochs_done", "steps", "losses" (mean MSE per epoch), "epoch_seconds"}``.
    With ``checkpoint`` (a path) the state is saved atomically after every epoch and a run resumes from it when
    its ``fingerprint`` matches (training on up to ``epochs`` in total); the last checkpoint, with nothing left
    to train, keeps only the weights (no optimizer state).
    """
    from tqdm import tqdm

    logger = getLogger()
    params = [p for p in lm.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    record = {"epochs_done": 0, "steps": 0, "losses": [], "epoch_seconds": []}

    def finished():
        return record["epochs_done"] >= epochs or (max_steps is not None and record["steps"] >= max_steps)

    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # our own file: tensors and numbers
        if saved.get("fingerprint") == fingerprint:
            load_trainable_state(lm, saved["trainable"])
            head.load_state_dict(saved["head"])
            record = saved["record"]
            if saved.get("optimizer") is not None:
                optimizer.load_state_dict(saved["optimizer"])
            logger.info(f"TSLRec stage 1: {'loaded the tuned model' if finished() else 'resuming'} from "
                        f"{checkpoint} (epoch {record['epochs_done']}, step {record['steps']})")
    device = next(head.parameters()).device
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    per_epoch = math.ceil(len(prompts) / batch_size)
    lm.train()
    head.train()
    while not finished():
        epoch = record["epochs_done"]
        order = np.random.default_rng(seed + epoch).permutation(len(prompts))
        start, total, seen = time.monotonic(), 0.0, 0
        bar = tqdm(range(per_epoch), desc=f"TSLRec stage 1 epoch {epoch + 1}/{epochs}", ncols=100,
                   disable=not show_progress)
        for b in bar:
            idx = order[b * batch_size:(b + 1) * batch_size]
            pred = head(represent(lm, tokenizer, [prompts[i] for i in idx], pooling, max_tokens))
            loss = F.mse_loss(pred, targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            record["steps"] += 1
            bar.set_postfix(loss=f"{total / seen:.5f}")
            if max_steps is not None and record["steps"] >= max_steps:
                break
        bar.close()
        record["epochs_done"] += 1
        record["losses"].append(total / max(seen, 1))
        record["epoch_seconds"].append(time.monotonic() - start)
        logger.info(f"TSLRec stage 1: epoch {record['epochs_done']}/{epochs}: {seen} users in {b + 1} steps, "
                    f"MSE {record['losses'][-1]:.6f}, {record['epoch_seconds'][-1]:.1f} s")
        if max_steps is not None and record["steps"] >= max_steps and record["epochs_done"] < epochs:
            logger.warning(f"TSLRec stage 1: stopped after tsl_max_steps={max_steps} steps "
                           f"({record['epochs_done']} of {epochs} epochs started)")
        if checkpoint is not None:
            save_checkpoint(checkpoint, lm, head, None if finished() else optimizer, record, fingerprint)
    lm.eval()
    head.eval()
    return record


def save_checkpoint(path, lm, head, optimizer, record, fingerprint) -> None:
    state = {"fingerprint": fingerprint, "trainable": trainable_state(lm),
             "head": {k: v.cpu() for k, v in head.state_dict().items()},
             "optimizer": optimizer.state_dict() if optimizer is not None else None, "record": record}
    with atomic_file(path, "wb") as f:
        torch.save(state, f)


# ----- the stage --------------------------------------------------------------------------------------------
def item_categories(config, dataset, inputs, out_dir, models_dir) -> np.ndarray:
    """Latent category per item id (cached as ``categories.npy``): k-means on the item embeddings of the forward
    helper model trained on the training prefixes (:func:`~recbole_llmser.helper_models.train_helper`, ``ccg_*``
    settings)."""
    path = out_dir / "categories.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    helper = train_helper(config, dataset, list(inputs.users), inputs.prefixes, "forward", models_dir)
    table = getattr(helper, "item_embedding", None)
    if not isinstance(table, nn.Embedding):
        raise LLMSeRError(f"ccg_model={config['ccg_model']} has no item_embedding table; TSLRec's latent categories "
                          "need one (use SASRec, GRU4Rec, NARM, ...)")
    emb = table.weight.detach().cpu().numpy()[: dataset.item_num]
    categories = kmeans_categories(emb, int(config["tsl_num_categories"]), int(config["seed"]))
    with atomic_file(path, "wb") as f:
        np.save(f, categories)
    return categories


def run(config, dataset, inputs, out_dir, spec, models_dir):
    """Stage 1 for ``inputs`` (users, training prefixes, item names): returns ``(lm, tokenizer, pooling)`` with
    the tuned weights, training (or resuming) as needed; writes ``categories.npy``, ``stage1.pt`` and
    ``stage1.json`` in ``out_dir`` and the helper model in ``models_dir``."""
    from recbole_llmser.tslrec.lm import add_lora, load_lm

    logger = getLogger()
    k, seed = int(config["tsl_num_categories"]), int(config["seed"])
    categories = item_categories(config, dataset, inputs, out_dir, models_dir)
    with_history = np.array([i for i, p in enumerate(inputs.prefixes) if len(p)], dtype=np.int64)
    chosen = with_history[subsample_users(len(with_history), config["tsl_max_users"], seed)]
    if len(chosen) < len(with_history):
        logger.warning(f"TSLRec stage 1: tsl_max_users={config['tsl_max_users']}: training on a seeded subsample "
                       f"of {len(chosen)} of the {len(with_history)} users with a training prefix")
    prefixes = [inputs.prefixes[i] for i in chosen]
    prompts = [user_prompt(inputs.names[p]) for p in prefixes]
    targets = category_histograms(prefixes, categories, k)

    torch.manual_seed(seed)
    lm, tokenizer, pooling = load_lm(spec, config["tsl_dtype"], config["device"])
    if config["tsl_pooling"] != "auto":
        pooling = config["tsl_pooling"]
    if config["tsl_lora"]:
        lm = add_lora(lm, config)
    hidden = int(getattr(lm.config, "hidden_size", 0) or lm.get_input_embeddings().weight.shape[1])
    head = make_head(hidden, k).to(config["device"])
    logger.info(f"TSLRec stage 1: {spec.label} ({'LoRA' if config['tsl_lora'] else 'full fine-tuning'}, "
                f"pooling {pooling}), {len(prompts)} users (one sample each), K={k} latent categories, "
                f"{config['tsl_epochs']} epoch(s) of {math.ceil(len(prompts) / int(config['tsl_batch_size']))} steps")
    record = fit(lm, head, tokenizer, prompts, targets, pooling=pooling, epochs=int(config["tsl_epochs"]),
                 batch_size=int(config["tsl_batch_size"]), lr=float(config["tsl_learning_rate"]),
                 max_tokens=int(config["tsl_max_tokens"]), max_steps=config["tsl_max_steps"], seed=seed,
                 checkpoint=out_dir / "stage1.pt", fingerprint=out_dir.name,
                 show_progress=bool(config["show_progress"]))
    sizes = np.bincount(categories[1:], minlength=k)
    atomic_write_json(out_dir / "stage1.json", {
        "lm": spec.label, "pooling": pooling, "lora": bool(config["tsl_lora"]), "num_categories": k,
        "category_sizes": sizes.tolist(), "users_with_history": int(len(with_history)), "users_trained": len(prompts),
        "subsample": len(prompts) < len(with_history), "max_steps": config["tsl_max_steps"],
        "batch_size": int(config["tsl_batch_size"]), **record,
    })
    return lm, tokenizer, pooling
