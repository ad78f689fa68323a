"""Item texts and the names items go by in prompts, shared by LLMSeR's LLM prompts (SNF, ARV) and TSLRec's
user prompts (stage 1) and item prompts (stage 2).

* :func:`item_texts`: each item's text (``item_text_field``) in RecBole's internal id order;
* :func:`prompt_titles`: each item's name in prompts: its text through :func:`capped_title`, else
  ``item <RecBole token>``;
* :func:`capped_title`: one line, capped at a length with "…". Not :func:`recbole_llmser.data.prepare.clean_title`,
  which prepares raw metadata titles (HTML-unescaped, pandas' missing-value strings dropped, no cap);
* :func:`one_line`: control and line-break characters to spaces, invisible format characters removed.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

_SPACE = re.compile(r"\s+")


def item_texts(dataset, field):
    """Item texts in RecBole's internal id order (index 0 = padding: ''), from the unbuilt dataset."""
    feat = dataset.item_feat
    ids = feat[dataset.iid_field].to_numpy()
    texts = [""] * dataset.item_num
    tokens = dataset.field2id_token[field]
    for iid, value in zip(ids, feat[field].tolist()):
        if isinstance(value, (list, np.ndarray)):  # token_seq: word ids
            texts[int(iid)] = " ".join(str(tokens[w]) for w in value if w != 0)
        else:
            texts[int(iid)] = str(tokens[value]) if value != 0 else ""
    return texts


def prompt_titles(dataset, texts, max_chars: int) -> list:
    """Each item's name in prompts, in RecBole's id order: its text (``texts``, from :func:`item_texts`) through
    :func:`capped_title` at ``max_chars``, else ``item <RecBole token>`` (every item when ``texts`` is None)."""
    tokens = dataset.field2id_token[dataset.iid_field]
    texts = [""] * dataset.item_num if texts is None else texts
    return [capped_title(t, max_chars, fallback=f"item {tokens[i]}") for i, t in enumerate(texts)]


def capped_title(text, max_chars: int = 120, fallback: str = "") -> str:
    """One-line, capped title: control characters removed, whitespace collapsed, cut at a word boundary with "…".

    Returns ``fallback`` when nothing is left (None, NaN, empty or only whitespace/control characters).
    """
    text = one_line(text) if isinstance(text, str) else ""
    if not text:
        return fallback
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space >= max_chars // 2:  # keep whole words unless that loses more than half
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + "…"


def one_line(text: str) -> str:
    """Control characters and line breaks -> spaces, invisible format characters removed, spaces collapsed."""
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cc" or category.startswith("Z"):
            kept.append(" ")
        elif not category.startswith("C"):
            kept.append(ch)
    return _SPACE.sub(" ", "".join(kept)).strip()
