"""HR@k / NDCG@k overall and per user-length group, under full ranking and ``uni<N>`` sampled negatives.

The maths is in small pure functions (ranks -> metrics, lengths -> groups); ``evaluate_split`` runs a model
over RecBole's validation or test rows and feeds them.

Conventions (stated in every report):

* rank = number of candidates scored strictly higher than the target, plus the other candidates scored
  *equal* to it (ties count against the model, so a constant scorer never looks good);
* HR@k = 1[rank < k], NDCG@k = 1/log2(rank + 2) if rank < k else 0 (one target per row);
* full ranking scores every item except padding and, as RecBole does for sequential models, does not remove
  the user's history items;
* ``uni<N>`` draws N negatives per row uniformly from the items the user never interacted with (in any split),
  with a generator seeded by ``seed`` so every model evaluated with the same seed sees the same negatives;
* the user-length of a user is the number of *training* items (sequence length minus validation and test
  items), never counting pseudo items.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from recbole_llmser.errors import LLMSeRError


def parse_protocol(protocol: str):
    """'full' -> None; 'uni100' -> 100."""
    if protocol == "full":
        return None
    if protocol.startswith("uni") and protocol[3:].isdigit():
        return int(protocol[3:])
    raise ValueError(f"unknown evaluation protocol {protocol!r}")


def ranks_from_scores(scores: torch.Tensor, target_scores: torch.Tensor, n_equal_self: int = 1) -> torch.Tensor:
    """Rank of each row's target among ``scores`` (B x C); ``n_equal_self`` is 1 when the target is one of
    the C columns (it ties with itself), else 0."""
    t = target_scores.unsqueeze(1)
    higher = (scores > t).sum(dim=1)
    equal = (scores == t).sum(dim=1) - n_equal_self
    return higher + equal


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict:
    """Mean HR@k and NDCG@k over rows with the given 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.int64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hit@{k}"] = float(hit.mean()) if len(ranks) else float("nan")
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else float("nan")
    return out


def assign_groups(lengths: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
    """Group index per user: bounds [2, 3] -> length <=2: 0, 3: 1, >=4: 2."""
    return np.searchsorted(np.asarray(bounds), np.asarray(lengths), side="left")


def group_ranges(bounds: Sequence[int]) -> list:
    """Readable ranges for ``bounds``: [2, 3] -> ['<=2', '3', '>=4']; [3, 6] -> ['<=3', '4-6', '>=7']."""
    if not bounds:
        return ["all"]
    out = [f"<={bounds[0]}"]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out.append(str(hi) if hi == lo + 1 else f"{lo + 1}-{hi}")
    out.append(f">={bounds[-1] + 1}")
    return out


def grouped_metrics(ranks, lengths, bounds, names, ks) -> dict:
    """Overall and per-group metrics with group sizes."""
    ranks = np.asarray(ranks)
    groups = assign_groups(lengths, bounds)
    names = list(names) if names else [f"group{i}" for i in range(len(bounds) + 1)]
    result = {"overall": {"n": int(len(ranks)), **metrics_from_ranks(ranks, ks)}, "groups": []}
    for g, (name, rng) in enumerate(zip(names, group_ranges(bounds))):
        mask = groups == g
        result["groups"].append({"name": name, "range": rng, "n": int(mask.sum()), **metrics_from_ranks(ranks[mask], ks)})
    return result


def sample_negatives(users, seen, n_items: int, n_neg: int, rng: np.random.Generator) -> np.ndarray:
    """``n_neg`` distinct items per row from 1..n_items-1, none in ``seen[user]`` (uniform, without replacement)."""
    out = np.empty((len(users), n_neg), dtype=np.int64)
    for row, u in enumerate(users):
        excluded = seen[u]
        available = n_items - 1 - len(excluded)
        if available < n_neg:
            raise ValueError(f"user {u}: only {available} unseen items, cannot draw {n_neg} negatives")
        picked = np.empty(0, dtype=np.int64)
        while len(picked) < n_neg:
            draw = rng.integers(1, n_items, size=2 * (n_neg - len(picked)) + 8)
            draw = draw[~np.isin(draw, excluded)]
            picked = np.concatenate([picked, draw])
            _, first = np.unique(picked, return_index=True)
            picked = picked[np.sort(first)]
        out[row] = picked[:n_neg]
    return out


@torch.no_grad()
def evaluate_split(model, eval_data, dataset, config, show_progress=False) -> dict:
    """Evaluate ``model`` on the rows of a RecBole eval dataloader; one grouped result per protocol.

    ``dataset`` is our :class:`recbole_llmser.data.dataset.SequentialDataset` (per-user lengths and items)."""
    split = eval_data._dataset
    protocols = list(config["eval_protocols"])
    ks = list(config["topk"])
    bounds, names = list(config["group_bounds"] or []), config["group_names"]
    device = config["device"]
    n_items = dataset.item_num
    lengths_by_user, seen = dataset.user_train_len, dataset.user_items
    rng = {p: np.random.default_rng([int(config["seed"]), parse_protocol(p) or 0]) for p in protocols}
    ranks = {p: [] for p in protocols}
    users_all, targets_all = [], []

    model.eval()
    batch = int(config["eval_batch_size"])
    starts = range(0, len(split), batch)
    for start in tqdm(starts, desc="Evaluate", disable=not show_progress, ncols=100):
        inter = split.inter_feat[start:start + batch].to(device)
        users = inter[dataset.uid_field].cpu().numpy()
        users_all.append(users)
        target = inter[dataset.iid_field]
        targets_all.append(target.cpu().numpy())
        scores = model.full_sort_predict(inter).view(len(inter), -1).float()
        scores[:, 0] = -torch.inf  # padding is never a candidate
        target_scores = scores.gather(1, target.view(-1, 1)).squeeze(1)
        for p in protocols:
            n_neg = parse_protocol(p)
            if n_neg is None:
                r = ranks_from_scores(scores, target_scores, n_equal_self=1)
            else:
                negs = torch.as_tensor(sample_negatives(users, seen, n_items, n_neg, rng[p]), device=scores.device)
                r = ranks_from_scores(scores.gather(1, negs), target_scores, n_equal_self=0)
            ranks[p].append(r.cpu().numpy())

    users_all = np.concatenate(users_all) if users_all else np.empty(0, dtype=np.int64)
    lengths = lengths_by_user[users_all]
    targets = np.concatenate(targets_all) if targets_all else np.empty(0, dtype=np.int64)
    shared = shared_targets(targets, assign_groups(lengths, bounds), names or [], bounds)
    tokens = dataset.field2id_token[dataset.iid_field]
    shared = [{**s, "item": str(tokens[s["item"]])} for s in shared]
    return {
        p: {"protocol": p, **grouped_metrics(np.concatenate(ranks[p]) if ranks[p] else np.empty(0), lengths, bounds,
                                             names, ks), **({"shared_targets": shared} if shared else {})}
        for p in protocols
    }


#: A group whose users share one target item this often is flagged under the results (see ``shared_targets``).
SHARED_TARGET_SHARE = 0.2


def shared_targets(targets, groups, names, bounds, threshold: float = SHARED_TARGET_SHARE) -> list:
    """Groups (overall included) in which one item is the target of at least ``threshold`` of the users:
    ``[{"group", "item", "share"}]``. Such a group's HR/NDCG move in steps with that one item's rank (a cut-off
    just above or below it flips a large share of the group), which reads like a defect but is the data."""
    names = list(names) if names else [f"group{i}" for i in range(len(bounds) + 1)]
    targets, groups = np.asarray(targets), np.asarray(groups)
    out = []
    for name, mask in [("overall", np.ones(len(targets), bool))] + [(n, groups == g) for g, n in enumerate(names)]:
        if mask.sum() < 10:
            continue
        items, counts = np.unique(targets[mask], return_counts=True)
        top = int(np.argmax(counts))
        share = counts[top] / mask.sum()
        if share >= threshold:
            out.append({"group": name, "item": int(items[top]), "share": round(float(share), 4)})
    return out


def format_results(results: dict, title: str) -> str:
    """Plain-text tables (one per protocol): rows = overall + groups, columns = n and metrics."""
    from tabulate import tabulate

    blocks = []
    for p, res in results.items():
        keys = [k for k in res["overall"] if k != "n"]
        rows = [["overall", "all", res["overall"]["n"], *(res["overall"][k] for k in keys)]]
        rows += [[g["name"], g["range"], g["n"], *(g[k] for k in keys)] for g in res["groups"]]
        table = tabulate(rows, headers=["group", "train len", "users", *keys], floatfmt=".4f")
        notes = [f"note: {s['share']:.0%} of the {s['group']} users share one {title} target (item {s['item']}): "
                 "that item's rank moves the group's HR/NDCG in one step between cut-offs" for s in res.get(
                     "shared_targets", [])]
        blocks.append("\n".join([f"{title} [{p}]", table, *notes]))
    return "\n\n".join(blocks)


def check_sampled_protocols(config, dataset) -> None:
    """Each ``uni<N>`` protocol draws N unseen items per user: refuse, in one line, a catalogue too small for it
    (called before anything is trained)."""
    sampled = [int(p[3:]) for p in config["eval_protocols"] or [] if p.startswith("uni")]
    if not sampled:
        return
    unseen = dataset.item_num - 1 - max((len(items) for items in dataset.user_items), default=0)
    if max(sampled) > unseen:
        raise LLMSeRError(
            f"dataset '{config['dataset']}': eval_protocols uni{max(sampled)} draws {max(sampled)} unseen items per "
            f"user, but some user has only {unseen} of the {dataset.item_num - 1} items unseen — use "
            f"--eval_protocols=\"[uni{max(unseen, 1)}, full]\" or --eval_protocols=\"[full]\"")

