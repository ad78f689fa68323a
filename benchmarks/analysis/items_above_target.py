"""Which items a trained run ranks above the test item, for the users of one length group (README, Results,
amazon-fashion-ids ablations). Loads a run folder written by ``run_recbole_llmser.py`` (its ``config.yaml``, its
checkpoint and, for LLMSeR runs, the artifact it names), re-evaluates the test split under full ranking on the CPU
and prints the group's rank distribution, its most common test item and item set, the items most often above the
test item and, for LLMSeR runs, how many users have each of them as a pseudo item.

    python benchmarks/analysis/items_above_target.py saved/amazon-fashion-ids/<run folder> [--min_len 4] [--max_above 20]

The run's data folder must still hold its dataset.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml

from recbole_llmser.compat import load_checkpoint
from recbole_llmser.config import Config
from recbole_llmser.data import create_dataset, data_preparation
from recbole_llmser.data.dataset import read_augmentation
from recbole_llmser.evaluation import ranks_from_scores
from recbole_llmser.registry import get_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--min_len", type=int, default=4, help="users with at least this many training items")
    parser.add_argument("--max_above", type=int, default=20, help="count items above the target for users whose "
                        "target has 1..max_above items above it")
    args = parser.parse_args(argv)

    saved = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    # the run's configuration (its config.yaml) on the CPU, less what RecBole derives from it again
    derived = {"train_neg_sample_args", "valid_neg_sample_args", "test_neg_sample_args", "eval_type", "MODEL_TYPE",
               "MODEL_INPUT_TYPE", "single_spec", "local_rank", "device", "checkpoint_dir"}
    settings = {k: v for k, v in saved.items() if k not in derived}
    settings.update(device="cpu", use_gpu=False, show_progress=False,
                    data_path=str(Path(saved["data_path"]).parent))  # RecBole stored <data_path>/<dataset>
    config = Config(model=saved["model"], dataset=saved["dataset"], config_dict=settings)
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset)
    checkpoint = next(args.run_dir.glob("*.pth"))
    model.load_state_dict(load_checkpoint(checkpoint, "cpu")["state_dict"])
    model.eval()

    inter = test_data._dataset.inter_feat
    users = inter[dataset.uid_field].numpy()
    rows = np.flatnonzero(dataset.user_train_len[users] >= args.min_len)
    above_counts, n_above = Counter(), []
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            batch = inter[torch.as_tensor(rows[start:start + 256])]
            scores = model.full_sort_predict(batch).view(len(batch), -1)
            scores[:, 0] = -torch.inf
            target = scores.gather(1, batch[dataset.iid_field].view(-1, 1)).squeeze(1)
            n_above.append(ranks_from_scores(scores, target).numpy())  # 0-based ranks, as the evaluation counts them
            for row_scores, t in zip(scores, target):
                above = torch.nonzero(row_scores > t).flatten().tolist()
                if 0 < len(above) <= args.max_above:
                    above_counts.update(above)
    n_above = np.concatenate(n_above)
    print(f"{args.run_dir.name}: {len(rows)} test users with >= {args.min_len} training items; "
          f"target at rank 1: {np.mean(n_above == 0):.3f}, top 5: {np.mean(n_above < 5):.3f}, "
          f"top 10: {np.mean(n_above < 10):.3f}")

    group_users = users[rows]
    targets = Counter(inter[dataset.iid_field].numpy()[rows].tolist())
    item_sets = Counter(tuple(dataset.user_items[u].tolist()) for u in group_users)
    (target, n_target), (item_set, n_set) = targets.most_common(1)[0], item_sets.most_common(1)[0]
    tokens = [dataset.id2token(dataset.iid_field, i) for i in item_set]
    print(f"most common test item: {dataset.id2token(dataset.iid_field, target)} ({n_target} users); most common "
          f"set of items interacted with: {n_set} users share {{{', '.join(tokens[:10])}{', ...' if len(tokens) > 10 else ''}}}")

    pseudo = Counter()
    if saved.get("aug_file"):
        augmentation = read_augmentation(saved["aug_file"], dataset.field2token_id[dataset.uid_field],
                                         dataset.field2token_id[dataset.iid_field], dataset.user_num)
        for ids in augmentation.pseudo.values():
            pseudo.update(ids.tolist())
        print(f"artifact {saved['aug_file']}: {len(pseudo)} distinct pseudo items")
    print(f"items most often above the target (users with 1..{args.max_above} items above it):")
    for item, n in above_counts.most_common(8):
        token = dataset.id2token(dataset.iid_field, item)
        print(f"  item {token}: above the target for {n} users; pseudo item of {pseudo[item]} users")


if __name__ == "__main__":
    main()
