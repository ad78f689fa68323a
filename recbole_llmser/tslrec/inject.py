"""Use a TSLRec item-embedding table in any RecBole sequential model, without touching RecBole's files.

After the model is built (``quick_start.run_with_config``), :func:`apply_item_embeddings` puts the table into
``model.item_embedding``, which RecBole's sequential models read as ``item_embedding(item_seq)`` and
``item_embedding.weight`` (SASRec, GRU4Rec, BERT4Rec, NARM, STAMP, ...):

* ``tsl_projection: pca`` (table width = the item-embedding width): the table, rescaled to the standard deviation
  of the model's own initialization (so RecBole's learning rate and weight decay keep their meaning), becomes the
  embedding: copied into the ``nn.Embedding`` and fine-tuned (``tsl_freeze: false``), or frozen;
* ``tsl_projection: learned`` (any width): ``weight = table @ P`` with a trainable projection ``P`` (width ->
  item-embedding width) initialized so that the rows have the model's initial scale; the table itself (the LM's
  representations, standardized) stays frozen unless ``tsl_freeze: false``.

Rows past the table (BERT4Rec's mask token, row ``n_items``) keep the model's own initialization and train.
"""

from __future__ import annotations

from logging import getLogger

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmser.errors import LLMSeRError


class TableEmbedding(nn.Module):
    """An ``nn.Embedding`` look-alike: ``weight = cat(table [@ proj], extra)``; row 0 (padding) gets no gradient."""

    def __init__(self, table: torch.Tensor, extra: torch.Tensor, freeze: bool, proj: torch.Tensor | None = None):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=not freeze)
        self.proj = None if proj is None else nn.Parameter(proj)
        self.extra = nn.Parameter(extra)  # (0, dim) for most models; BERT4Rec's mask-token row
        self.padding_idx = 0
        self.num_embeddings = table.shape[0] + extra.shape[0]
        self.embedding_dim = extra.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        rows = self.table if self.proj is None else self.table @ self.proj
        return torch.cat([rows, self.extra]) if len(self.extra) else rows

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if self.proj is not None and not len(self.extra):  # project only the rows looked up
            return F.embedding(index, self.table, self.padding_idx) @ self.proj
        return F.embedding(index, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        proj = f", projection {tuple(self.proj.shape)}" if self.proj is not None else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, table {tuple(self.table.shape)} "
                f"{'trainable' if self.table.requires_grad else 'frozen'}{proj}, padding_idx=0")


def apply_item_embeddings(model: nn.Module, table: np.ndarray, freeze: bool = False, projection: str = "pca"):
    """Put ``table`` (one row per item id, row 0 = padding) into ``model.item_embedding``; returns the model."""
    emb = getattr(model, "item_embedding", None)
    if not isinstance(emb, nn.Embedding):
        raise LLMSeRError(f"TSLRec: {type(model).__name__} has no item_embedding table (nn.Embedding) to initialize")
    n, width = table.shape
    dim = emb.embedding_dim
    if emb.num_embeddings < n or n < 2:
        raise LLMSeRError(f"TSLRec: the table has {n} rows but {type(model).__name__} embeds "
                          f"{emb.num_embeddings} items")
    weight = emb.weight.detach()
    device, dtype = weight.device, weight.dtype
    init_std = float(weight[1:n].std())  # the model's own initialization scale (RecBole: initializer_range)
    rows = torch.as_tensor(np.asarray(table[1:], np.float64))
    rows = rows - rows.mean(0)
    rows = rows / rows.std().clamp(min=1e-12)
    rows = torch.cat([torch.zeros(1, width, dtype=rows.dtype), rows]).to(device, dtype)  # unit scale, row 0 = 0
    extra = weight[n:].clone()
    if projection == "pca":
        if width != dim:
            raise LLMSeRError(f"tsl_projection=pca: the table is {width} wide but {type(model).__name__}'s item "
                              f"embedding is {dim}; build a table for this width or use --tsl_projection=learned")
        rows = rows * init_std
        if not freeze:
            with torch.no_grad():
                emb.weight[:n] = rows
            new = emb
        else:
            new = TableEmbedding(rows, extra, freeze=True)
    elif projection == "learned":
        proj = torch.randn(width, dim, dtype=torch.float64) * (init_std / width ** 0.5)  # seeded by init_seed
        new = TableEmbedding(rows, extra, freeze=freeze, proj=proj.to(device, dtype))
    else:
        raise LLMSeRError(f"property 'tsl_projection' = {projection!r}: expected pca or learned")
    model.item_embedding = new
    getLogger().info(f"TSLRec: item embeddings of {type(model).__name__} from a {n} x {width} table "
                     f"({projection}, {'frozen' if freeze else 'fine-tuned'})")
    return model
