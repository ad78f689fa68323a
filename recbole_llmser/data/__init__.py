"""Dataset creation: make sure the atomic files exist (prepare.py), then let RecBole load them."""

from __future__ import annotations

from logging import getLogger

from recbole.data import data_preparation  # noqa: F401  (re-exported for quick_start)

from recbole_llmser.data.dataset import AugmentedSequentialDataset, SequentialDataset
from recbole_llmser.data.prepare import prepare_dataset
from recbole_llmser.dct import ALL_POSITION_MODELS, dct_enabled
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.methods import uses_llmser


def create_dataset(config):
    """Prepare the dataset's atomic files if needed, then load them into our ``SequentialDataset``, or into an
    ``AugmentedSequentialDataset`` for dual-channel training (``method: llmser`` with ``aug_file``, or
    ``train_all_positions`` on a model with an all-positions adapter).

    Unlike RecBole's ``create_dataset`` this never loads a pickled dataset from ``checkpoint_dir``."""
    prepare_dataset(config)
    if dct_enabled(config):
        dataset = AugmentedSequentialDataset(config)
    else:
        if not uses_llmser(config) and config["train_all_positions"]:
            getLogger().warning(
                f"train_all_positions: {config['model']} has no all-positions adapter "
                f"(have: {', '.join(ALL_POSITION_MODELS)}); training on RecBole's rows"
            )
        dataset = SequentialDataset(config)
    text_field = config["item_text_field"]
    if text_field and (dataset.item_feat is None or text_field not in dataset.item_feat):
        raise LLMSeRError(
            f"dataset '{config['dataset']}': item text field '{text_field}' was not loaded; "
            f"add it to load_col.item or set --item_text_field=~"
        )
    getLogger().info(str(dataset))
    return dataset
