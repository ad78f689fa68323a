"""Model and trainer lookup: recbole_llmser's own first, then RecBole's (as RecBole-GNN's ``get_model`` /
``get_trainer`` do). Above the trainers in the import graph: nothing the trainers import imports this module."""

from __future__ import annotations

from recbole.utils import ModelType
from recbole.utils import get_model as _recbole_get_model
from recbole.utils import get_trainer as _recbole_get_trainer

from recbole_llmser import trainer as _trainers
from recbole_llmser.dct import dct_enabled
from recbole_llmser.errors import LLMSeRError


def get_model(model_name: str):
    """The model class called ``model_name`` (the package has no models of its own: RecBole's), or a one-line
    error."""
    if not isinstance(model_name, str) or not model_name:
        raise LLMSeRError(f"--model: expected a model name, got {model_name!r}")
    try:
        return _recbole_get_model(model_name)
    except (ValueError, ImportError):  # ImportError: the search reaches recbole.model.exlib_recommender,
        # whose __init__ imports lightgbm/xgboost (not installed)
        raise LLMSeRError(
            f"--model={model_name}: no such model in recbole_llmser or RecBole 1.2.1 "
            "(names are case-sensitive, e.g. SASRec, GRU4Rec, BERT4Rec)"
        ) from None


def get_trainer(model_type, model_name: str, config=None):
    """The trainer class: ``<model_name>Trainer`` from :mod:`recbole_llmser.trainer` when there is one; for sequential
    models ``DualChannelTrainer`` when ``config`` asks for dual-channel training (``dct_enabled``), else our
    ``SequentialTrainer``; RecBole's trainer otherwise."""
    own = getattr(_trainers, f"{model_name}Trainer", None)
    if own is not None:
        return own
    if model_type == ModelType.SEQUENTIAL:
        return _trainers.DualChannelTrainer if config is not None and dct_enabled(config) else _trainers.SequentialTrainer
    return _recbole_get_trainer(model_type, model_name)
